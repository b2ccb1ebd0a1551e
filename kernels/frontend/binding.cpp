// tidal._frontend: the native gRPC front end (frontend.h) as Python sees it.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <vector>

#include "frontend.h"

namespace nb = nanobind;
using tidal::frontend::Arrival;
using tidal::frontend::Frontend;
using tidal::frontend::Options;

namespace {

nb::bytes payload_bytes(const grpc::ByteBuffer& buffer) {
  PyObject* out = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(buffer.Length()));
  if (out == nullptr) throw nb::python_error();
  tidal::frontend::copy_out(buffer, PyBytes_AS_STRING(out));
  return nb::steal<nb::bytes>(out);
}

// [(id, payload, deadline_s or None, authorization or None)], [cancelled ids]
nb::tuple drain(Frontend& frontend) {
  std::vector<Arrival> arrivals;
  std::vector<uint64_t> cancelled;
  frontend.drain(arrivals, cancelled);
  nb::list calls;
  for (const auto& arrival : arrivals) {
    nb::object deadline = arrival.deadline_s ? nb::cast(*arrival.deadline_s) : nb::none();
    nb::object authorization = arrival.authorization
                                   ? nb::object(nb::bytes(arrival.authorization->data(), arrival.authorization->size()))
                                   : nb::none();
    calls.append(nb::make_tuple(arrival.id, payload_bytes(arrival.payload), deadline, authorization));
  }
  nb::list gone;
  for (uint64_t id : cancelled) gone.append(id);
  return nb::make_tuple(calls, gone);
}

}  // namespace

NB_MODULE(_frontend, m) {
  m.doc() = "tidal's native gRPC front end: gRPC C++ takes the calls, ModelInfer is drained in bulk";
  nb::class_<Frontend>(m, "Frontend")
      .def(
          "__init__",
          [](Frontend* self, std::string address, std::string relay_target, std::string infer_method,
             double loop_stall_s, int max_message_bytes, int max_pending, int max_pushback_ms) {
            new (self) Frontend(Options{std::move(address), std::move(relay_target), std::move(infer_method),
                                        loop_stall_s, max_message_bytes, max_pending, max_pushback_ms});
          },
          nb::arg("address"), nb::arg("relay_target"), nb::arg("infer_method"), nb::arg("loop_stall_s"),
          nb::arg("max_message_bytes"), nb::arg("max_pending"), nb::arg("max_pushback_ms"))
      .def("start", &Frontend::start, nb::call_guard<nb::gil_scoped_release>(),
           "Bind and start; the bound port (0 for a Unix socket). RuntimeError when it cannot bind.")
      .def("fileno", &Frontend::event_fd, "An eventfd, readable while calls wait to be drained.")
      .def("drain", &drain, "([(id, payload, deadline_s, authorization)], [cancelled ids]) since the last drain; deadlines on time.monotonic()'s clock.")
      .def(
          "answer",
          [](Frontend& self, uint64_t id, nb::bytes response) {
            const char* data = response.c_str();
            size_t size = response.size();
            nb::gil_scoped_release release;
            return self.answer(id, data, size);
          },
          nb::arg("id"), nb::arg("response"), "Answer a drained call OK; False when it is no longer waiting.")
      .def("refuse", &Frontend::refuse, nb::arg("id"), nb::arg("code"), nb::arg("message"), nb::arg("pushback_ms"),
           nb::call_guard<nb::gil_scoped_release>(), "End a drained call with a status; False as for answer.")
      .def("set_health", &Frontend::set_health, nb::arg("service"), nb::arg("status"),
           "The grpc.health.v1 serving status of a service (\"\": the server) that Check answers.")
      .def("tick", &Frontend::tick, "The event loop is alive; Check is relayed to Python after loop_stall_s without.");
}

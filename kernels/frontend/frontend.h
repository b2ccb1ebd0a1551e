// tidal's native gRPC front end: gRPC C++ owns the port, so accepting calls, HTTP/2 framing and the
// per-call bookkeeping cost no Python and no event-loop time.
//
// ModelInfer, the one method on every request's path, is handed to Python in bulk: the calls that arrived
// since the last look wait in one queue, an eventfd tells the event loop there are some, and one drain
// returns them all under one GIL acquisition. Python decides and answers each (answer/refuse) from any
// thread. Health checks are answered here from the statuses Python sets, while the event loop shows it is
// alive (`tick`), so a probe never waits behind a saturated loop and still fails when the loop hangs. Every
// other method (metadata, reflection, control, health's Watch, streaming inference) is relayed byte for
// byte to the Python gRPC server on a private Unix socket, so each keeps the behaviour it has there.
//
// Threading: gRPC's callback threads never touch Python; Python's calls take the front end's mutex only.
#pragma once

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace tidal::frontend {

// One ModelInfer call waiting for Python to take it.
struct Arrival {
  uint64_t id;
  grpc::ByteBuffer payload;
  std::optional<double> deadline_s;  // the client's deadline on CLOCK_MONOTONIC; none when it set none
  std::optional<std::string> authorization;
  std::chrono::steady_clock::time_point arrived;  // the age of the oldest is the backlog's wait, for pushback
};

struct Options {
  std::string address;        // where clients connect: host:port or unix:/path
  std::string relay_target;   // the Python server, unix:/path
  std::string infer_method;   // the full method name handled natively
  double loop_stall_s;        // health checks go to Python once the loop has not ticked for this long
  int max_message_bytes;
  int max_pending;            // calls queued for Python; beyond it a call is refused at once
  int max_pushback_ms;        // the longest retry hint a refusal gives (tidal.errors.MAX_PUSHBACK_MS)
};

class InferCall;

// A message's bytes, however gRPC sliced them, written contiguously to `out` (ByteBuffer::Length() bytes).
void copy_out(const grpc::ByteBuffer& buffer, char* out);

class Frontend final : public grpc::CallbackGenericService {
 public:
  explicit Frontend(Options options);
  ~Frontend() override;

  // Binds and starts; returns the bound port (0 for a Unix socket). Throws std::runtime_error if it cannot.
  int start();
  int event_fd() const { return event_fd_; }

  // Takes every call queued since the last drain and the ids of taken calls whose clients have cancelled.
  void drain(std::vector<Arrival>& arrivals, std::vector<uint64_t>& cancelled);
  // Each taken call is answered exactly once; false when it is unknown (already answered, or stopped).
  bool answer(uint64_t id, const char* data, size_t size);
  bool refuse(uint64_t id, int code, const std::string& message, const std::string& pushback_ms);
  // grpc.health.v1 status (HealthCheckResponse.ServingStatus) of a service; "" is the server.
  void set_health(const std::string& service, int status);
  // The event loop is alive: called by Python from the loop, more often than `loop_stall_s`.
  void tick();

  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override;

  // Called by InferCall and HealthCall on gRPC's threads.
  void arrive(InferCall* call, grpc::ByteBuffer&& payload);
  void cancelled(uint64_t id);
  std::optional<int> health(const std::string& service);  // none: unknown

 private:
  bool loop_alive();
  // Refuses every call not yet answered (UNAVAILABLE), then shuts the server down. A serving process never
  // gets here: it ends without shutting gRPC down (GrpcServer.prepare_exit says why).
  void stop();
  InferCall* take(uint64_t id);
  void notify_locked();

  Options options_;
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<grpc::Channel> relay_channel_;
  std::unique_ptr<grpc::GenericStub> relay_;
  int event_fd_ = -1;

  std::mutex mutex_;
  bool stopped_ = false;
  bool notified_ = false;
  uint64_t next_id_ = 1;
  std::vector<Arrival> queued_;
  std::vector<uint64_t> cancels_;
  std::unordered_map<uint64_t, InferCall*> taken_;  // queued or drained, not answered
  std::unordered_map<std::string, int> health_;
  std::chrono::steady_clock::time_point last_tick_;
};

}  // namespace tidal::frontend

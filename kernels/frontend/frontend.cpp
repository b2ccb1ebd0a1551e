#include "frontend.h"

#include <grpc/support/time.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <utility>

namespace tidal::frontend {
namespace {

// The call's deadline on CLOCK_MONOTONIC (std::chrono::steady_clock here; time.monotonic() in Python), so the
// time a call waits to be taken counts against it.
std::optional<double> deadline_of(const grpc::GenericCallbackServerContext* ctx) {
  gpr_timespec deadline = gpr_convert_clock_type(ctx->raw_deadline(), GPR_CLOCK_MONOTONIC);
  if (gpr_time_cmp(deadline, gpr_inf_future(GPR_CLOCK_MONOTONIC)) == 0) return std::nullopt;
  gpr_timespec left = gpr_time_sub(deadline, gpr_now(GPR_CLOCK_MONOTONIC));
  double now_s = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  return now_s + static_cast<double>(left.tv_sec) + static_cast<double>(left.tv_nsec) * 1e-9;
}

// Headers gRPC sets itself on the relayed call, or that only make sense on one hop.
bool relayed_header(grpc::string_ref key) {
  if (key.empty() || *key.data() == ':') return false;
  if (key.starts_with("grpc-")) return false;
  return key != "te" && key != "content-type" && key != "user-agent";
}

constexpr char kHealthCheck[] = "/grpc.health.v1.Health/Check";
constexpr char kHealthRequest[] = "grpc.health.v1.HealthCheckRequest";

bool read_varint(const unsigned char*& at, const unsigned char* end, uint64_t& value) {
  value = 0;
  for (int shift = 0; shift < 64 && at < end; shift += 7) {
    unsigned char byte = *at++;
    value |= static_cast<uint64_t>(byte & 0x7f) << shift;
    if (!(byte & 0x80)) return true;
  }
  return false;
}

bool valid_utf8(const std::string& text) {
  size_t i = 0, n = text.size();
  while (i < n) {
    unsigned char c = text[i];
    int more = c < 0x80 ? 0 : (c >> 5) == 0x6 ? 1 : (c >> 4) == 0xe ? 2 : (c >> 3) == 0x1e ? 3 : -1;
    if (more < 0 || i + more >= n) return false;
    uint32_t code = more == 0 ? c : c & (0x3f >> more);
    for (int k = 1; k <= more; ++k) {
      unsigned char next = text[i + k];
      if ((next & 0xc0) != 0x80) return false;
      code = (code << 6) | (next & 0x3f);
    }
    static const uint32_t smallest[] = {0, 0x80, 0x800, 0x10000};
    if (code < smallest[more] || code > 0x10ffff || (code >= 0xd800 && code <= 0xdfff)) return false;
    i += more + 1;
  }
  return true;
}

// HealthCheckRequest's `service` (field 1), or none where protobuf's own parser would refuse the message.
std::optional<std::string> health_service(const std::string& message) {
  const auto* at = reinterpret_cast<const unsigned char*>(message.data());
  const auto* end = at + message.size();
  std::string service;
  while (at < end) {
    uint64_t tag, value;
    if (!read_varint(at, end, tag) || (tag >> 3) == 0) return std::nullopt;
    switch (tag & 7) {
      case 0:
        if (!read_varint(at, end, value)) return std::nullopt;
        break;
      case 1:
      case 5: {
        size_t width = (tag & 7) == 1 ? 8 : 4;
        if (static_cast<size_t>(end - at) < width) return std::nullopt;
        at += width;
        break;
      }
      case 2:
        if (!read_varint(at, end, value) || value > static_cast<uint64_t>(end - at)) return std::nullopt;
        if ((tag >> 3) == 1) service.assign(reinterpret_cast<const char*>(at), value);
        at += value;
        break;
      default:  // groups: no HealthCheckRequest carries one
        return std::nullopt;
    }
  }
  if (!valid_utf8(service)) return std::nullopt;
  return service;
}

}  // namespace

void copy_out(const grpc::ByteBuffer& buffer, char* out) {
  std::vector<grpc::Slice> slices;
  (void)buffer.Dump(&slices);
  for (const auto& slice : slices) {
    std::memcpy(out, slice.begin(), slice.size());
    out += slice.size();
  }
}

// A health check, answered from the statuses Python set, with the statuses and messages of Python's servicer.
class HealthCall final : public grpc::ServerGenericBidiReactor {
 public:
  explicit HealthCall(Frontend* owner) : owner_(owner) { StartRead(&request_); }

  void OnReadDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "Check takes one request message, got none"));
      return;
    }
    std::string message(request_.Length(), '\0');
    copy_out(request_, message.data());
    std::optional<std::string> service = health_service(message);
    if (!service) {
      Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "the message (" + std::to_string(message.size()) + " bytes) does not parse as " +
                              kHealthRequest + ": Error parsing message with type '" + kHealthRequest + "'"));
      return;
    }
    std::optional<int> status = owner_->health(*service);
    if (!status) {
      Finish(grpc::Status(grpc::StatusCode::NOT_FOUND, ""));
      return;
    }
    char response[2] = {0x08, static_cast<char>(*status)};  // HealthCheckResponse{status}; statuses are 1..3
    grpc::Slice slice(response, sizeof response);
    response_ = grpc::ByteBuffer(&slice, 1);
    StartWriteAndFinish(&response_, grpc::WriteOptions(), grpc::Status::OK);
  }

  void OnDone() override { delete this; }

 private:
  Frontend* owner_;
  grpc::ByteBuffer request_;
  grpc::ByteBuffer response_;
};

// A ModelInfer call: read its one message, queue it for Python, write what Python answers.
class InferCall final : public grpc::ServerGenericBidiReactor {
 public:
  InferCall(Frontend* owner, grpc::GenericCallbackServerContext* ctx) : owner_(owner), ctx_(ctx) {
    StartRead(&request_);
  }

  grpc::GenericCallbackServerContext* context() const { return ctx_; }
  std::atomic<uint64_t> id{0};  // set by the front end when queued; OnCancel may read it meanwhile

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client closed (or cancelled) without sending its request
      Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "ModelInfer takes one request message, got none"));
      return;
    }
    owner_->arrive(this, std::move(request_));
  }

  void OnCancel() override {
    if (uint64_t queued = id.load(); queued != 0) owner_->cancelled(queued);
  }

  void OnDone() override { delete this; }

  void answer(const char* data, size_t size) {
    grpc::Slice slice(data, size);
    response_ = grpc::ByteBuffer(&slice, 1);
    StartWriteAndFinish(&response_, grpc::WriteOptions(), grpc::Status::OK);
  }

  void refuse(int code, const std::string& message, const std::string& pushback_ms) {
    if (!pushback_ms.empty()) ctx_->AddTrailingMetadata("grpc-retry-pushback-ms", pushback_ms);
    Finish(grpc::Status(static_cast<grpc::StatusCode>(code), message));
  }

 private:
  Frontend* owner_;
  grpc::GenericCallbackServerContext* ctx_;
  grpc::ByteBuffer request_;
  grpc::ByteBuffer response_;
};

// Any other method: a relay of messages both ways, with deadline, metadata, cancellation, status and trailers.
// Initial metadata is not relayed (tidal's servicers send none).
//
// The upstream call is freed by gRPC as soon as it is done, so it must never be touched after that. One hold,
// taken before it starts and released once (`end_locked`) when its stream has ended or the client is gone,
// keeps it from being done while this side may still start an operation on it; after `ended_` nothing but
// its own pending reactions touches it. This call is finished only from the upstream's OnDone.
class RelayCall final : public grpc::ServerGenericBidiReactor {
 public:
  RelayCall(grpc::GenericStub* stub, grpc::GenericCallbackServerContext* ctx) : ctx_(ctx), upstream_(this) {
    for (const auto& [key, value] : ctx->client_metadata()) {
      if (relayed_header(key)) {
        client_ctx_.AddMetadata(std::string(key.data(), key.size()), std::string(value.data(), value.size()));
      }
    }
    client_ctx_.set_deadline(ctx->raw_deadline());
    stub->PrepareBidiStreamingCall(&client_ctx_, ctx->method(), grpc::StubOptions(), &upstream_);
    upstream_.AddHold();
    upstream_.StartRead(&down_);
    upstream_.StartCall();
    StartRead(&up_);
  }

  // Client -> upstream: one message at a time, the next read once it is written.
  void OnReadDone(bool ok) override {
    std::lock_guard<std::recursive_mutex> lock(mutex_);
    if (ended_) return;
    if (ok) {
      upstream_.StartWrite(&up_);
    } else {
      upstream_.StartWritesDone();
    }
  }
  void upstream_wrote(bool ok) {
    if (ok) StartRead(&up_);  // after a failed write the upstream ends with its status
  }

  // Upstream -> client.
  void upstream_read(bool ok) {
    if (ok) {
      StartWrite(&down_);
      return;
    }
    std::lock_guard<std::recursive_mutex> lock(mutex_);
    end_locked();
  }
  void OnWriteDone(bool ok) override {
    std::lock_guard<std::recursive_mutex> lock(mutex_);
    if (ended_) return;
    if (ok) {
      upstream_.StartRead(&down_);
    } else {  // the client is gone: end the upstream, read nothing more
      client_ctx_.TryCancel();
      end_locked();
    }
  }

  void upstream_done(const grpc::Status& status) {
    {
      std::lock_guard<std::recursive_mutex> lock(mutex_);
      ended_ = true;
      for (const auto& [key, value] : client_ctx_.GetServerTrailingMetadata()) {
        if (key != "grpc-status-details-bin") {  // carried by the status itself
          ctx_->AddTrailingMetadata(std::string(key.data(), key.size()), std::string(value.data(), value.size()));
        }
      }
    }
    Finish(status);  // last: OnDone may free this call before Finish returns
  }

  void OnCancel() override { client_ctx_.TryCancel(); }
  void OnDone() override { delete this; }

 private:
  void end_locked() {
    if (ended_) return;
    ended_ = true;
    upstream_.RemoveHold();
  }

  class Upstream final : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
   public:
    explicit Upstream(RelayCall* call) : call_(call) {}
    void OnReadDone(bool ok) override { call_->upstream_read(ok); }
    void OnWriteDone(bool ok) override { call_->upstream_wrote(ok); }
    void OnDone(const grpc::Status& status) override { call_->upstream_done(status); }

   private:
    RelayCall* call_;
  };

  grpc::GenericCallbackServerContext* ctx_;
  grpc::ClientContext client_ctx_;
  Upstream upstream_;
  grpc::ByteBuffer up_;
  grpc::ByteBuffer down_;
  std::recursive_mutex mutex_;  // held while starting upstream operations, whose reactions never run inline
  bool ended_ = false;
};

Frontend::Frontend(Options options) : options_(std::move(options)) {
  if (options_.max_pending < 1 || options_.max_pushback_ms < 1)
    throw std::invalid_argument("max_pending and max_pushback_ms must be at least 1");
  event_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (event_fd_ < 0) throw std::runtime_error("eventfd failed");
}

Frontend::~Frontend() {
  stop();
  if (event_fd_ >= 0) close(event_fd_);
}

int Frontend::start() {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);  // the front end already applied the limit
  args.SetMaxSendMessageSize(-1);
  relay_channel_ = grpc::CreateCustomChannel(options_.relay_target, grpc::InsecureChannelCredentials(), args);
  relay_ = std::make_unique<grpc::GenericStub>(relay_channel_);

  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(options_.address, grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(options_.max_message_bytes);
  builder.SetMaxSendMessageSize(options_.max_message_bytes);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.RegisterCallbackGenericService(this);
  server_ = builder.BuildAndStart();
  if (!server_) throw std::runtime_error("cannot bind gRPC to " + options_.address + " (address in use or not available)");
  return port;
}

grpc::ServerGenericBidiReactor* Frontend::CreateReactor(grpc::GenericCallbackServerContext* ctx) {
  if (ctx->method() == options_.infer_method) return new InferCall(this, ctx);
  if (ctx->method() == kHealthCheck && loop_alive()) return new HealthCall(this);
  return new RelayCall(relay_.get(), ctx);
}

bool Frontend::loop_alive() {
  std::lock_guard<std::mutex> lock(mutex_);
  return std::chrono::steady_clock::now() - last_tick_ < std::chrono::duration<double>(options_.loop_stall_s);
}

void Frontend::tick() {
  std::lock_guard<std::mutex> lock(mutex_);
  last_tick_ = std::chrono::steady_clock::now();
}

void Frontend::set_health(const std::string& service, int status) {
  std::lock_guard<std::mutex> lock(mutex_);
  health_[service] = status;
}

std::optional<int> Frontend::health(const std::string& service) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto found = health_.find(service);
  if (found == health_.end()) return std::nullopt;
  return found->second;
}

void Frontend::notify_locked() {
  if (notified_) return;
  notified_ = true;
  uint64_t one = 1;
  while (write(event_fd_, &one, sizeof one) < 0 && errno == EINTR) {
  }
}

void Frontend::arrive(InferCall* call, grpc::ByteBuffer&& payload) {
  auto* ctx = call->context();
  Arrival arrival{0, std::move(payload), deadline_of(ctx), std::nullopt, std::chrono::steady_clock::now()};
  auto found = ctx->client_metadata().find("authorization");
  if (found != ctx->client_metadata().end()) arrival.authorization.emplace(found->second.data(), found->second.size());
  std::unique_lock<std::mutex> lock(mutex_);
  if (stopped_) {
    lock.unlock();
    call->refuse(static_cast<int>(grpc::StatusCode::UNAVAILABLE), "server is not accepting requests (shutting down)", "");
    return;
  }
  if (static_cast<int>(queued_.size()) >= options_.max_pending) {
    size_t waiting = queued_.size();
    // What the oldest waiting call has waited is what a retry would wait now: the hint, as Python's are, is
    // at least 1 ms (0 invites a retry into the same overload) and at most max_pushback_ms.
    double waited_ms = queued_.empty() ? 0.0
        : std::chrono::duration<double, std::milli>(arrival.arrived - queued_.front().arrived).count();
    long pushback = std::lround(std::clamp(waited_ms, 1.0, static_cast<double>(options_.max_pushback_ms)));
    lock.unlock();
    call->refuse(static_cast<int>(grpc::StatusCode::RESOURCE_EXHAUSTED),
                 "the server's backlog is full: " + std::to_string(waiting) +
                     " calls wait for the event loop to take them (--max-pending-rpcs); retry after " +
                     std::to_string(pushback) + " ms or on another replica",
                 std::to_string(pushback));
    return;
  }
  call->id = arrival.id = next_id_++;
  taken_.emplace(arrival.id, call);
  if (ctx->IsCancelled()) cancels_.push_back(arrival.id);  // cancelled before it had an id to report
  queued_.push_back(std::move(arrival));
  notify_locked();
}

void Frontend::cancelled(uint64_t id) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!taken_.count(id)) return;
  cancels_.push_back(id);
  notify_locked();
}

void Frontend::drain(std::vector<Arrival>& arrivals, std::vector<uint64_t>& cancelled) {
  std::lock_guard<std::mutex> lock(mutex_);
  uint64_t count;
  while (read(event_fd_, &count, sizeof count) < 0 && errno == EINTR) {
  }
  notified_ = false;
  arrivals.swap(queued_);
  cancelled.swap(cancels_);
}

InferCall* Frontend::take(uint64_t id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto found = taken_.find(id);
  if (found == taken_.end()) return nullptr;
  InferCall* call = found->second;
  taken_.erase(found);
  return call;
}

bool Frontend::answer(uint64_t id, const char* data, size_t size) {
  InferCall* call = take(id);
  if (call == nullptr) return false;
  call->answer(data, size);
  return true;
}

bool Frontend::refuse(uint64_t id, int code, const std::string& message, const std::string& pushback_ms) {
  InferCall* call = take(id);
  if (call == nullptr) return false;
  call->refuse(code, message, pushback_ms);
  return true;
}

void Frontend::stop() {
  std::unordered_map<uint64_t, InferCall*> left;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopped_) return;
    stopped_ = true;
    left.swap(taken_);
    queued_.clear();
    cancels_.clear();
  }
  for (auto& [id, call] : left) {
    call->refuse(static_cast<int>(grpc::StatusCode::UNAVAILABLE), "server is not accepting requests (shutting down)", "");
  }
  if (server_) {
    server_->Shutdown(std::chrono::system_clock::now());
    server_->Wait();
    server_.reset();
  }
}

}  // namespace tidal::frontend

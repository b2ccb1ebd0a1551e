"""Generated protobuf/gRPC modules (built from protos/ by cmake/genproto.py; never edited).

They register into this private descriptor pool instead of the process-wide
default one: tritonclient registers its own `grpc_service.proto` and
`model_config.proto` (same package and names) in the default pool, and a
process that imports both must keep working.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()

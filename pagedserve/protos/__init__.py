"""Generated gRPC stubs (checked in; `make protos` regenerates them from protos/)."""

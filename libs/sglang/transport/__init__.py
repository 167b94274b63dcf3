"""gRPC transport: servers, clients and proto conversion. The only package that imports the
generated code in ``sglang.v1``."""

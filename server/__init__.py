"""The gRPC / HTTP service (a thin adapter over ``spruce.Engine``); built in the service issue."""

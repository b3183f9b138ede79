"""Start and supervise a real Triton Inference Server that serves the Kubrick engine (`kubrick serve`)."""

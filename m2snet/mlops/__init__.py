"""MLOps: experiment tracking (MLflow), the model registry and its promotion gate, the pyfunc model,
ONNX export, serving and the local services (SeaweedFS S3, an MLflow server) they talk to."""

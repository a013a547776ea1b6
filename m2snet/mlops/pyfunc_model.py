"""The code MLflow runs to load an m2snet pyfunc model ("models from code").

:func:`m2snet.mlops.pyfunc_logging.log_segmentation_model` logs this file as the model's ``python_model``:
MLflow copies it into the model and, at load time, executes it (with the m2snet package the model
carries in ``code/`` on the path) instead of unpickling a ``python_model.pkl``. So loading a registered
model imports m2snet's own code and reads its checkpoints weights-only; it unpickles nothing.
"""

import mlflow.models

from m2snet.mlops.pyfunc import SegmentationPyfunc

mlflow.models.set_model(SegmentationPyfunc())

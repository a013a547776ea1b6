"""The Kubeflow side: components (thin functions over ``m2snet.workflows.steps``), the pipeline that
wires them, and compile / local run / submit. The only code that imports the kfp DSL; the library
below never imports it (import-linter holds that wall, see pyproject.toml)."""

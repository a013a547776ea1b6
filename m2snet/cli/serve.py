"""`m2snet serve`: the production model behind MLflow's scoring server, as the cluster runs it."""

from __future__ import annotations

import logging
import os

import typer

app = typer.Typer()
log = logging.getLogger("m2snet.cli.serve")


@app.command("serve")
def serve_cmd(
    model: str = typer.Option("models:/m2snet-busi@production", "--model",
                              help="Model URI; an alias is resolved once, at start."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 in a container)."),
    port: int = typer.Option(8080, "--port"),
    workers: int = typer.Option(1, "--workers", help="Scoring server worker processes."),
) -> None:
    """Serve MODEL over REST (POST /invocations, GET /ping, GET /health): the alias's version now, downloaded
    once; every response names that version (column model_version). Promote or roll back, then restart the
    server (`kubectl rollout restart deployment/m2snet-serve` on the cluster) to answer with the new one."""
    from m2snet.mlops.pyfunc import SERVED_MODEL_ENV
    from m2snet.mlops.serving import serve_plan
    from m2snet.processes import interpreter_bin

    plan = serve_plan(model, host, port, workers)
    typer.echo(f"serving {plan.served_as} ({model}) on http://{host}:{port} from {plan.local_dir}", err=True)
    # exec: the scoring server takes this process's place, so a container's SIGTERM reaches it directly.
    # mlflow starts uvicorn by name: this environment's bin first, so a never-activated virtualenv works.
    path = os.pathsep.join([str(interpreter_bin()), os.environ.get("PATH", "")])
    os.execve(plan.argv[0], plan.argv, {**os.environ, SERVED_MODEL_ENV: plan.served_as, "PATH": path})

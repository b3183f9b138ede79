"""The `kubrick` command line: flags and sub-commands only; each one hands off to the module that does the work.

Imports stay light here (no torch, no engine): `kubrick --help` and the chat must start fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
import typer.core

from kubrick.errors import KubrickError

class _HelpFlagMixin:
    """--help takes no value, so its row in the help shows no type (typer would print <bool>)."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class _Group(_HelpFlagMixin, typer.core.TyperGroup):
    pass


class _Command(_HelpFlagMixin, typer.core.TyperCommand):
    pass


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=False,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Chat with gpt-oss from your terminal, served by NVIDIA Triton Inference Server.\n\n"
    "Run `kubrick` for an interactive chat, `kubrick -p QUESTION` for one answer, `kubrick serve` to start a server.",
)


@app.callback()
def chat(
    ctx: typer.Context,
    prompt: Optional[str] = typer.Option(None, "-p", "--prompt", metavar="QUESTION", help="Ask one question, print the answer and exit."),
    triton_url: Optional[str] = typer.Option(None, "--triton-url", metavar="URL", help="Server URL: localhost:8000, http://… or https://… \\[env TRITON_URL; default http://localhost:8000]"),
    model_name: Optional[str] = typer.Option(None, "--model-name", metavar="NAME", help="Model to chat with \\[env TRITON_MODEL_NAME; default llm_decoupled]"),
    system: Optional[str] = typer.Option(None, "--system", "-s", metavar="TEXT", help="System prompt for this chat."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", metavar="X", help="Sampling temperature (0 = greedy)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", metavar="P", help="Nucleus sampling: keep the smallest set of tokens whose probability reaches this."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", metavar="N", help="Most tokens in one reply."),
    seed: Optional[int] = typer.Option(None, "--seed", metavar="N", help="Sampling seed: the same seed gives the same reply."),
    reasoning_effort: Optional[str] = typer.Option(None, "--reasoning", "-r", metavar="low|medium|high", help="Reasoning effort: low, medium or high."),
    hide_reasoning: bool = typer.Option(False, "--hide-reasoning", metavar="", help="Do not show the model's reasoning."),
    json_output: bool = typer.Option(False, "--json", metavar="", help="Print one JSON event per line (non-interactive)."),
    load: Optional[str] = typer.Option(None, "--load", metavar="ID", help="Continue a saved conversation (id, name or path)."),
    version: bool = typer.Option(False, "--version", metavar="", help="Print the version and exit."),
) -> None:
    """Chat with the model (the default command)."""
    if version:
        from kubrick import __version__

        typer.echo(f"kubrick {__version__}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is not None:
        return
    from kubrick.chat.app import ChatOptions, run_chat

    options = ChatOptions(
        prompt=prompt,
        triton_url=triton_url,
        model_name=model_name,
        system=system,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        seed=seed,
        reasoning_effort=reasoning_effort,
        hide_reasoning=hide_reasoning,
        json_output=json_output,
        load=load,
    )
    raise typer.Exit(run_chat(options))


@app.command("config", cls=_Command)
def config_command(
    triton_url: Optional[str] = typer.Option(None, "--triton-url", metavar="URL", help="Show the effective values as if this flag were given."),
    model_name: Optional[str] = typer.Option(None, "--model-name", metavar="NAME", help="Show the effective values as if this flag were given."),
) -> None:
    """Show the effective settings and where each one came from."""
    from kubrick.config import show_config

    show_config(triton_url=triton_url, model_name=model_name)


@app.command("serve", cls=_Command)
def serve_command(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", metavar="PATH", help="gpt-oss checkpoint folder \\[env TRITON_CHECKPOINT; default ./models/gpt-oss-20b if it holds one, else the embedded random model]"),
    device: Optional[str] = typer.Option(None, "--device", metavar="DEVICE", help="Where the engine runs: cpu, cuda or cuda:N \\[env TRITON_DEVICE; default cuda:0 when a GPU is there, else cpu]"),
    context_length: Optional[int] = typer.Option(None, "--context-length", metavar="N", help="Longest conversation in tokens \\[env TRITON_CONTEXT_LENGTH; default 8192]"),
    http_port: int = typer.Option(8000, "--http-port", metavar="PORT", help="HTTP port (generate_stream, health)."),
    grpc_port: int = typer.Option(8001, "--grpc-port", metavar="PORT", help="gRPC port."),
    metrics_port: int = typer.Option(8002, "--metrics-port", metavar="PORT", help="Prometheus metrics port."),
    host: str = typer.Option("127.0.0.1", "--host", metavar="ADDRESS", help="Address to bind; 0.0.0.0 exposes the server to the network."),
    model_repository: Optional[Path] = typer.Option(None, "--model-repository", metavar="PATH", help="Triton model repository; default: the one shipped with kubrick."),
    kv_cache_memory: Optional[str] = typer.Option(None, "--kv-cache-memory", metavar="FRACTION|SIZE", help="KV-cache memory: a fraction of free GPU memory after the weights and CUDA graphs, such as 0.9, or a size, such as 8GiB \\[env KUBRICK_KV_CACHE_MEMORY; default 0.9 on a GPU, 256MiB on a CPU]"),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", metavar="N", help="Most sequences in one batched step \\[env KUBRICK_MAX_BATCH; default 64]"),
    step_tokens: Optional[int] = typer.Option(None, "--step-tokens", metavar="N", help="Most tokens (decode + prefill) in one batched step, which bounds its time; at least --max-batch + 16 \\[env KUBRICK_STEP_TOKENS; default 512]"),
) -> None:
    """Start a real Triton Inference Server serving gpt-oss (Ctrl-C stops it)."""
    from kubrick.server.serve import ServeOptions, serve

    raise typer.Exit(
        serve(
            ServeOptions(
                checkpoint=checkpoint,
                device=device,
                context_length=context_length,
                http_port=http_port,
                grpc_port=grpc_port,
                metrics_port=metrics_port,
                host=host,
                model_repository=model_repository,
                kv_cache_memory=kv_cache_memory,
                max_batch=max_batch,
                step_tokens=step_tokens,
            )
        )
    )


@app.command("make-checkpoint", cls=_Command)
def make_checkpoint_command(
    out: Path = typer.Argument(..., metavar="OUT", help="Folder to write the checkpoint into (created; must be empty or absent)."),
    layout: str = typer.Option("original", "--layout", metavar="original|hf", help="original (gpt-oss's own files) or hf (Hugging Face)."),
    preset: str = typer.Option("tiny", "--preset", metavar="tiny|20b|120b", help="tiny (52 MB, runs on a CPU), 20b (13.8 GB on disk) or 120b (65 GB)."),
    config: Optional[Path] = typer.Option(None, "--config", metavar="FILE", help="A JSON model config to use instead of a preset."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Random seed for the weights."),
) -> None:
    """Write a random gpt-oss checkpoint (valid MXFP4 experts) for tests, demos and benchmarks."""
    from kubrick.engine.make_checkpoint import make_checkpoint

    def starting(size: int) -> None:
        if size > 1 << 30:  # the 20b and 120b presets take minutes: say what is coming
            typer.echo(f"writing about {size / 1e9:.0f} GB of random weights into {out} …", err=True)

    written = make_checkpoint(out, layout=layout, preset=preset, config_file=config, seed=seed, on_start=starting)
    shape = f"the shape in {config}" if config else f"the {preset} preset"
    typer.echo(f"wrote a random gpt-oss checkpoint ({shape}, {layout} layout, seed {seed}) to {written}")
    typer.echo(f"serve it with: kubrick serve --checkpoint {written}")


def main() -> None:
    """Entry point: run the app; expected failures print one line to stderr and exit non-zero."""
    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except KubrickError as err:
        typer.echo(f"kubrick: error: {err}", err=True)
        sys.exit(err.exit_code)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        typer.echo("kubrick: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as err:  # a bad flag or value: one line, like our own errors
        if isinstance(err, _usage_error_classes()):
            typer.echo(f"kubrick: error: {_usage_error_text(err)}", err=True)
            sys.exit(err.exit_code)
        raise


def _usage_error_classes() -> tuple[type, ...]:
    """Click's usage-error base: typer >= 0.25 vendors click (typer._click), older typer uses click itself."""
    classes: list[type] = []
    try:
        from typer._click.exceptions import ClickException as vendored

        classes.append(vendored)
    except ImportError:
        pass
    try:
        from click.exceptions import ClickException

        classes.append(ClickException)
    except ImportError:
        pass
    return tuple(classes)


def _usage_error_text(err: Exception) -> str:
    """Click's message on one line, with where to look for the right usage."""
    message = " ".join(err.format_message().split()).rstrip(".")  # type: ignore[attr-defined]
    ctx = getattr(err, "ctx", None)
    command = ctx.command_path if ctx is not None else "kubrick"
    return f"{message} (see `{command} --help`)"


if __name__ == "__main__":
    main()

"""The `kubrick` command line: flags and sub-commands only; each one hands off to the module that does the work.

Imports stay light here (no torch, no engine): `kubrick --help` and the chat must start fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from kubrick.errors import KubrickError

app = typer.Typer(
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
    prompt: Optional[str] = typer.Option(None, "-p", "--prompt", help="Ask one question, print the answer and exit."),
    triton_url: Optional[str] = typer.Option(None, "--triton-url", help="Server URL: localhost:8000, http://… or https://… \\[env TRITON_URL; default http://localhost:8000]"),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Model to chat with \\[env TRITON_MODEL_NAME; default llm_decoupled]"),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt for this chat."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", help="Sampling temperature (0 = greedy)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling: keep the smallest set of tokens whose probability reaches this."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Most tokens in one reply."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed: the same seed gives the same reply."),
    reasoning_effort: Optional[str] = typer.Option(None, "--reasoning", "-r", help="Reasoning effort: low, medium or high."),
    hide_reasoning: bool = typer.Option(False, "--hide-reasoning", help="Do not show the model's reasoning."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON event per line (non-interactive)."),
    load: Optional[str] = typer.Option(None, "--load", help="Continue a saved conversation (id, name or path)."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
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


@app.command("config")
def config_command(
    triton_url: Optional[str] = typer.Option(None, "--triton-url", help="Show the effective values as if this flag were given."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Show the effective values as if this flag were given."),
) -> None:
    """Show the effective settings and where each one came from."""
    from kubrick.config import show_config

    show_config(triton_url=triton_url, model_name=model_name)


@app.command("serve")
def serve_command(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="gpt-oss checkpoint folder [env TRITON_CHECKPOINT]; default: the embedded default model."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda:0, cpu … [env TRITON_DEVICE; default cuda:0 when a GPU is there, else cpu]"),
    context_length: Optional[int] = typer.Option(None, "--context-length", help="Longest conversation in tokens [env TRITON_CONTEXT_LENGTH; default 8192]"),
    http_port: int = typer.Option(8000, "--http-port", help="HTTP port (generate_stream, health)."),
    grpc_port: int = typer.Option(8001, "--grpc-port", help="gRPC port."),
    metrics_port: int = typer.Option(8002, "--metrics-port", help="Prometheus metrics port."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 exposes the server to the network."),
    model_repository: Optional[Path] = typer.Option(None, "--model-repository", help="Triton model repository; default: the one shipped with kubrick."),
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
            )
        )
    )


@app.command("make-checkpoint")
def make_checkpoint_command(
    out: Path = typer.Argument(..., help="Folder to write the checkpoint into (created; must be empty or absent)."),
    layout: str = typer.Option("original", "--layout", help="original (gpt-oss's own files) or hf (Hugging Face)."),
    preset: str = typer.Option("tiny", "--preset", help="tiny, 20b or 120b."),
    config: Optional[Path] = typer.Option(None, "--config", help="A JSON model config to use instead of a preset."),
    seed: int = typer.Option(0, "--seed", help="Random seed for the weights."),
) -> None:
    """Write a random gpt-oss checkpoint (valid MXFP4 experts) for tests, demos and benchmarks."""
    from kubrick.engine.make_checkpoint import make_checkpoint

    make_checkpoint(out, layout=layout, preset=preset, config_file=config, seed=seed)


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
    except Exception as err:  # click usage errors and friends
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()

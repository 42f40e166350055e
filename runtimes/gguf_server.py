"""An OpenAI-compatible HTTP server for a GGUF artifact: llama-cpp-python's server, loaded our way.

Chat requests are formatted with the GGUF's own tokenizer.chat_template (the shared CHAT_TEMPLATE)
by llama-cpp-python's Jinja formatter, and stop at the <|eos|> that ends every turn.
"""
from __future__ import annotations

from pathlib import Path

from nima_edge.errors import NimaError
from nima_edge.runtimes.gguf import default_threads, no_extra_bufts, read_metadata


def create_app(model: str | Path, host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
               api_key: str | None = None):
    """The FastAPI app with the model loaded (extra CPU buffer types off, as in the runtime)."""
    from llama_cpp.server.app import create_app as llama_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    meta = read_metadata(model)
    if "tokenizer.chat_template" not in meta:
        raise NimaError(f"{model} carries no chat template", "re-export it with nima-edge export --target gguf")
    threads = threads or default_threads()
    model_settings = ModelSettings(model=str(model), model_alias=Path(model).stem,
                                   n_ctx=int(meta["llama.context_length"]), n_threads=threads,
                                   n_threads_batch=threads, chat_format="chat_template.default", verbose=False)
    server_settings = ServerSettings(host=host, port=port, api_key=api_key)
    try:
        with no_extra_bufts():
            return llama_app(server_settings=server_settings, model_settings=[model_settings])
    except ValueError as e:
        raise NimaError(f"llama.cpp could not load {model}: {e}", "re-export it with nima-edge export") from e


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
          api_key: str | None = None) -> None:
    import uvicorn
    uvicorn.run(create_app(model, host, port, threads, api_key), host=host, port=port, log_level="warning")

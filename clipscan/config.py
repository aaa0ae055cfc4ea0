"""Job configs: a YAML file plus dotted ``key=value`` overrides in, a frozen validated model out.

Every field carries a one-line comment with its unit. An unknown key or a wrong type
fails before any work and names the key and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A job config that cannot be used; the message names the file and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Section):
    path: str  # corpus root, manifest file, COCO JSON or WebDataset shard pattern (local or s3:// gs://)
    format: Literal["auto", "flickr8k", "coco", "manifest", "webdataset"] = "auto"  # corpus layout
    caption: Literal["longest", "first"] = "longest"  # which caption is the image's caption (paper: longest)
    images: str | None = None  # images folder for flickr8k/coco when not beside the captions file
    limit: int | None = Field(default=None, ge=1)  # read at most this many images (rows), None = all
    rows_per_block: int = Field(default=256, ge=1)  # rows per input shard (one Ray block, one resume unit)
    max_pixels: int = Field(default=89_478_485, ge=1)  # larger images are skipped (decompression bombs), pixels
    generate: int | None = Field(default=None, ge=2)  # if data.path is missing, generate this many scenes there first


class ModelsConfig(Section):
    probe: str  # the model under test: open_clip:NAME@TAG | open_clip:CONFIG.json[@WEIGHTS] | hf:ID_OR_DIR | py:module:factory
    reference: str | None = None  # the visual reference model, same spec syntax (DAF needs it)


class EmbedConfig(Section):
    image_size: int = Field(default=224, ge=8)  # decoded square side in px (shortest side resized, centre crop)
    batch_size: int = Field(default=64, ge=1)  # images per encoder batch
    actors: int | None = Field(default=None, ge=1)  # encoder actors; None = one per GPU, or one on CPU
    cpus_per_actor: float | None = Field(default=None, gt=0)  # CPUs reserved per actor; None = leave one for decoding
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto = fp16 on GPU, fp32 on CPU
    threads: int | None = Field(default=None, ge=1)  # torch threads per CPU actor; None = CPUs of the node
    decode_cpus: float = Field(default=0.5, gt=0)  # CPUs per decode task
    gpus: int | None = Field(default=None, ge=0)  # GPUs to plan the pool for; None = what the cluster has or its autoscaler can add


class KnnConfig(Section):
    k: int = Field(default=10, ge=1)  # neighbours per image, self excluded
    index: str = "Flat"  # FAISS factory string; "Flat" = exact sharded search, e.g. "IVF4096,Flat" approximate (one index per shard; "IVF,Flat" = 4*sqrt(shard rows) lists)
    nprobe: int = Field(default=16, ge=1)  # IVF lists visited per query (approximate index only)
    shards: int | None = Field(default=None, ge=1)  # database shards, one actor each holding both models' vectors of its rows; None = one per GPU, or one per CPU node
    query_block: int = Field(default=16384, ge=1)  # queries per search call (rows per block of the query stream)
    search_actors: int = Field(default=2, ge=1)  # query-stream actors (each sends its block to every shard and merges the answers)
    train_sample: int = Field(default=100_000, ge=1)  # vectors used to train an approximate index
    recall_queries: int = Field(default=1000, ge=1)  # queries checked against exact search for recall@k


class MiningConfig(Section):
    rank_by: Literal["overlap", "jaccard", "gap", "max_gap"] = "overlap"  # low overlap@k / low Jaccard / high mean or max (probe cos - reference cos) of probe-only neighbours
    cases: int = Field(default=100, ge=1)  # failure cases handed to the summary and the report
    pair_probe_min: float = 0.95  # pair mode: probe cosine at least this (Eyes Wide Shut: 0.95)
    pair_reference_max: float = 0.6  # pair mode: reference cosine at most this (Eyes Wide Shut: 0.6)
    rank_depth: int = Field(default=100, ge=1)  # reference rank of a probe-only neighbour is exact up to this depth


def _off_is_not_false(value: Any) -> Any:
    return "off" if value is False else value  # YAML reads a bare `off` as false


class LlmConfig(Section):
    backend: Annotated[Literal["off", "openai", "vllm"], BeforeValidator(_off_is_not_false)] = "off"  # off | openai (any OpenAI-compatible server) | vllm (Ray Data LLM)
    url: str = "http://127.0.0.1:8000/v1"  # OpenAI-compatible base URL (openai backend)
    model: str = "meta-llama/Llama-3.1-8B-Instruct"  # model name on the server, or HF id / local dir for vllm
    prompt: str | None = None  # prompt template file; None = the paper's prompt (configs/prompts/daf.txt)
    cases_per_prompt: int = Field(default=10, ge=1)  # failure cases packed into one prompt at most
    max_prompt_tokens: int = Field(default=3000, ge=64)  # prompt budget in tokens, chat template included (tokenizer count, else 4 chars a token)
    tokenizer: str | None = None  # tokenizer dir or HF id for counting prompt tokens; None = llm.model if it loads locally, else 4 chars a token
    max_tokens: int = Field(default=512, ge=1)  # answer budget in tokens
    temperature: float = Field(default=0.0, ge=0)  # sampling temperature
    concurrency: int = Field(default=4, ge=1)  # requests in flight (openai backend)
    timeout_s: float = Field(default=120.0, gt=0)  # per request, seconds
    retries: int = Field(default=3, ge=0)  # retries per request with exponential backoff
    backoff_s: float = Field(default=1.0, ge=0)  # delay before the first retry, doubled for each further one, seconds
    extra_body: dict[str, Any] = Field(default_factory=dict)  # extra JSON fields merged into each chat request (openai backend)
    merge_threshold: float = Field(default=0.85, gt=0, le=1)  # cosine of heading+description embeddings to merge failure types
    examples: int = Field(default=8, ge=0)  # example image ids kept per failure type
    replicas: int | None = Field(default=None, ge=1)  # vllm engine replicas; None = one per GPU
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # extra vLLM engine arguments
    processor_kwargs: dict[str, Any] = Field(default_factory=dict)  # extra vLLMEngineProcessorConfig fields (batch_size, placement_group_config, ...)


def _paper_transforms() -> dict[str, dict[str, Any]]:
    # "Unveiling Glitches" section 3.2; flips, inversion and perspective always fire (p = 1)
    return {
        "grayscale": {},
        "rotation": {"degrees": 30},
        "affine": {"degrees": 15, "translate": [0.1, 0.1], "scale": [0.9, 1.1], "shear": 10},
        "hflip": {"p": 1.0},
        "invert": {"p": 1.0},
        "perspective": {"distortion_scale": 0.3, "p": 1.0},
        "elastic": {"alpha": 50.0, "sigma": 5.0},
    }


class TcacSection(Section):
    pool_k: int = Field(default=10, ge=1)  # nearest captions per own caption in the candidate pool
    transforms: dict[str, dict[str, Any]] = Field(default_factory=_paper_transforms)  # transform name -> its parameters (torchvision v2 argument names; `op: rotation` picks the transform for another name)
    top: int = Field(default=10, ge=1)  # captions listed before and after
    report_top: int = Field(default=100, ge=1)  # images per transform in the report
    forward_rows: int = Field(default=64, ge=1)  # encoder inputs per forward pass, fixed (last one padded) so scores do not depend on Ray's batching; embed.batch_size is rounded up to fill whole passes


class ReportConfig(Section):
    rows: int = Field(default=50, ge=1)  # cases shown in report.html
    thumb: int = Field(default=128, ge=16)  # thumbnail side in px


class RayConfig(Section):
    address: str | None = None  # Ray cluster address; None = RAY_ADDRESS or a local Ray started by the job
    num_cpus: int | None = Field(default=None, ge=1)  # CPUs of a local Ray started by the job; None = all


class JobConfig(Section):
    data: DataConfig
    models: ModelsConfig
    output: str  # the run directory (local path or s3:// gs:// URI)
    seed: int = 0  # seed for every random choice of the job
    embed: EmbedConfig = EmbedConfig()
    report: ReportConfig = ReportConfig()
    ray: RayConfig = RayConfig()


class DafConfig(JobConfig):
    knn: KnnConfig = KnnConfig()
    mining: MiningConfig = MiningConfig()
    llm: LlmConfig = LlmConfig()


class TcacConfig(JobConfig):
    knn: KnnConfig = KnnConfig()
    tcac: TcacSection = TcacSection()
    llm: LlmConfig = LlmConfig()



C = TypeVar("C", bound=BaseModel)


def _set_dotted(tree: dict[str, Any], key: str, value: Any, source: str) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["knn.k=5", "output=/x"]`` -> ``[("knn.k", 5), ("output", "/x")]``; values parsed as YAML scalars."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        if key in ("output", "data.path", "data.images") or key.startswith("models."):
            value = raw  # paths and model specs stay strings even when they look like numbers
        parsed.append((key.strip(), value))
    return parsed


def _describe(err: Any, model: type[BaseModel]) -> str:
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, err["loc"][:-1])
        hint = f" (allowed here: {', '.join(allowed)})" if allowed else ""
        return f"unknown key {key!r}{hint}"
    if err["type"] == "missing":
        return f"missing key {key!r}"
    return f"key {key!r}: {err['msg']} (got {err.get('input')!r})"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
    return sorted(getattr(current, "model_fields", {}).keys())


def load_config(cls: type[C], path: str | None, overrides: list[str] | None = None) -> C:
    """Load ``path`` (YAML) into ``cls``, apply dotted overrides, validate strictly.

    Raises ``ConfigError`` naming the file and every bad key.
    """
    source = path or "<command line>"
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        tree = loaded
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value, source)
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        problems = "; ".join(_describe(err, cls) for err in e.errors())
        raise ConfigError(f"{source}: {problems}") from None


def config_dict(cfg: BaseModel) -> dict[str, Any]:
    """The resolved config as plain JSON-ready data."""
    return cfg.model_dump(mode="json")

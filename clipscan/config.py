"""Job configs: a YAML file plus dotted ``key=value`` overrides in, a frozen validated model out.

Every field carries a one-line comment with its unit. An unknown key or a wrong type
fails before any work and names the key and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A job config that cannot be used; the message names the file and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Section):
    path: str | None = None  # corpus root, manifest file, COCO JSON or WebDataset shard pattern (local or s3:// gs://); may be left out when every model is emb:
    format: Literal["auto", "flickr8k", "coco", "manifest", "webdataset"] = "auto"  # corpus layout
    caption: Literal["longest", "first"] = "longest"  # which caption is the image's caption (paper: longest)
    images: str | None = None  # images folder for flickr8k/coco when not beside the captions file
    limit: int | None = Field(default=None, ge=1)  # read at most this many images (rows), None = all
    rows_per_block: int = Field(default=100_000, ge=1)  # rows per input shard, the resume unit (read in Ray blocks of at most 1,024 rows); also rows per block read from emb: files
    stream_min_rows: int = Field(default=1_000_000, ge=0)  # a Parquet manifest (file or folder of parts) of at least this many rows is read in Ray tasks, shard by shard, not listed on the driver
    max_pixels: int = Field(default=89_478_485, ge=1)  # larger images are skipped (decompression bombs), pixels
    decode_timeout_s: float = Field(default=60.0, gt=0)  # an image whose decoder runs longer is skipped and the decoder restarted, seconds
    decode_memory_mb: int | None = Field(default=2048, ge=256)  # address space of the decoder process; an image that needs more is skipped, MiB; None = no limit
    image_plugins: list[str] = Field(default_factory=list)  # Pillow plugins for the decoder: `module` (imported) or `module:function` (called), e.g. pillow_heif:register_heif_opener
    generate: int | None = Field(default=None, ge=2)  # if data.path is missing, generate this many scenes there first
    generate_max_objects: int = Field(default=5, ge=1, le=5)  # objects per generated scene at most (data.generate)


class ModelsConfig(Section):
    probe: str  # the model under test: open_clip:NAME@TAG | open_clip:CONFIG.json[@WEIGHTS] | hf:ID_OR_DIR | py:module:factory | emb:PATH (precomputed)
    reference: str | None = None  # the visual reference model, same spec syntax (DAF needs it)


class EmbedConfig(Section):
    image_size: int = Field(default=224, ge=8)  # decoded square side in px (shortest side resized, centre crop)
    batch_size: int | None = Field(default=None, ge=1)  # images per encoder batch; None = 256 on GPU, 64 on CPU
    actors: int | None = Field(default=None, ge=1)  # encoder actors; None = one per GPU, or one per CPU node
    cpus_per_actor: float | None = Field(default=None, gt=0)  # CPUs reserved per actor; None = from the node's CPUs
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto = fp16 on GPU, fp32 on CPU (autocast; weights stay fp32)
    threads: int | None = Field(default=None, ge=1)  # torch threads per CPU actor; None = the CPUs it reserves, rounded up
    decode: Literal["auto", "actor", "tasks", "gpu"] = "auto"  # where images are decoded: auto = in the encoder actor on CPU nodes, CPU tasks beside GPU actors; gpu = nvJPEG on the actor's GPU
    decode_cpus: float = Field(default=0.5, gt=0)  # CPUs per decode task (decode: tasks)
    gpus: int | None = Field(default=None, ge=0)  # GPUs to plan the pool for; None = what the cluster has or its autoscaler can add


class KnnConfig(Section):
    k: int = Field(default=10, ge=1)  # neighbours per image, self excluded
    index: str = "Flat"  # FAISS factory string; "Flat" = exact sharded search, e.g. "IVF4096,Flat" approximate (one index per shard; "IVF,Flat" = 4*sqrt(shard rows) lists)
    nprobe: int = Field(default=16, ge=1)  # IVF lists visited per query (approximate index only)
    shards: int | None = Field(default=None, ge=1)  # database shards, one actor each holding both models' vectors of its rows; None = one per GPU, or one per CPU node
    query_block: int = Field(default=16384, ge=1)  # queries per search call: each part of the run is cut into blocks of at most this many rows, each written once (a rerun keeps them)
    search_actors: int = Field(default=2, ge=1)  # query-stream actors (each sends its block to every shard and merges the answers)
    train_sample: int = Field(default=100_000, ge=1)  # vectors used to train an approximate index (at least 39 per IVF list where the shard has them)
    recall_queries: int = Field(default=1000, ge=1)  # queries checked against exact search for recall@k
    device: Literal["auto", "cpu"] = "auto"  # auto = GPUs where the cluster has them (FAISS must see them; an IVF index is searched on the shard's GPU), cpu = never
    stage_min_rows: int = Field(default=100_000, ge=2)  # corpora of at least this many images are searched and mined by the sharded Ray stage; smaller ones in the job's own process (same results, no per-stage start-up cost; memory ~ images x both widths)


class MiningConfig(Section):
    rank_by: Literal["overlap", "jaccard", "gap", "max_gap"] = "overlap"  # low overlap@k / low Jaccard / high mean or max (probe cos - reference cos) of probe-only neighbours, in standardised cosines (gap_z, max_gap_z)
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
    judge_cases: int = Field(default=40, ge=0)  # held-out cases (and as many controls) each failure type is judged on; 0 = no judge
    judge_types: int = Field(default=10, ge=1)  # failure types judged at most (the most frequent first)
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
    margin: float = Field(default=0.01, ge=0, le=1)  # probability a caption must gain on every caption it displaced to count as a change beyond the margin (changed_margin)
    report_top: int = Field(default=100, ge=1)  # images per transform in the report
    forward_rows: int = Field(default=64, ge=1)  # encoder inputs per forward pass, fixed (last one padded) so scores do not depend on Ray's batching; embed.batch_size is rounded up to fill whole passes


class AttributesConfig(Section):
    enabled: bool = True  # compare captions per attribute (attributes.json, the report's first section)
    names: list[str] = Field(default_factory=lambda: ["colour", "count", "size", "position", "object", "action", "scene"])  # attributes compared, each with a lexicon (shipped, or in `lexicons`)
    lexicons: dict[str, str] = Field(default_factory=dict)  # attribute -> word-list file (one word a line, # comments), replacing or adding to the shipped ones
    cases: int = Field(default=10_000, ge=1)  # top discrepant images (TCAC: image-transform rows) whose pairs are compared
    control: Literal["rank_matched", "reference", "matched", "pooled"] = "rank_matched"  # the lift's control: reference neighbours at the probe-only ones' reference ranks | the case's reference top-k | agreeing pairs at matched probe cosine | the last two pooled
    bins: int = Field(default=10, ge=1)  # probe-cosine quantile bins of the matched control
    examples: int = Field(default=8, ge=0)  # example case ids kept per attribute
    batch_size: int = Field(default=1024, ge=1)  # rows per batch of the Ray Data stage
    planted: str | None = None  # the attribute a demo probe was built blind to; the report then says the run is a planted check of the method


class ReportConfig(Section):
    rows: int = Field(default=50, ge=1)  # cases shown in report.html
    thumb: int = Field(default=128, ge=16)  # thumbnail side in px


class RayConfig(Section):
    address: str | None = None  # Ray cluster address; None = RAY_ADDRESS or a local Ray started by the job
    num_cpus: int | None = Field(default=None, ge=1)  # CPUs of a local Ray started by the job; None = all


class JobConfig(Section):
    data: DataConfig = DataConfig()
    models: ModelsConfig
    output: str  # the run directory (local path or s3:// gs:// URI)
    seed: int = 0  # seed for every random choice of the job
    embed: EmbedConfig = EmbedConfig()
    report: ReportConfig = ReportConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _corpus_or_precomputed(self) -> JobConfig:
        precomputed = [m for m in (self.models.probe, self.models.reference) if m is not None]
        if self.data.path is None and not (self.models.reference is not None
                                           and all(m.startswith("emb:") for m in precomputed)):
            raise ValueError("data.path is required unless models.probe and models.reference are both emb:PATH")
        return self


class DafConfig(JobConfig):
    knn: KnnConfig = KnnConfig()
    mining: MiningConfig = MiningConfig()
    attributes: AttributesConfig = AttributesConfig()
    llm: LlmConfig = LlmConfig()


class TcacConfig(JobConfig):
    knn: KnnConfig = KnnConfig()
    tcac: TcacSection = TcacSection()
    attributes: AttributesConfig = AttributesConfig()
    llm: LlmConfig = LlmConfig()



C = TypeVar("C", bound=BaseModel)


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key repeated in one mapping is an error, not the last one winning."""


def _mapping_without_repeats(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"key {key!r} is given twice", key_node.start_mark
            )
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


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
    given: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        if key.strip() in given:
            raise ConfigError(
                f"override {key.strip()!r} is given more than once ({given[key.strip()]!r}, then {item!r}); "
                "give each key once. A brace pattern such as data.path=shard-{00000..00099}.tar is expanded "
                "by the shell into one argument per shard: quote it ('data.path=shard-{00000..00099}.tar')"
            )
        given[key.strip()] = item
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
            loaded = yaml.load(text, Loader=_StrictLoader)  # noqa: S506  # a SafeLoader that refuses repeated keys
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


def _spec_list(value: Any) -> Any:
    # a command-line override arrives as one string: "[spec, spec]" or a single spec
    if isinstance(value, str):
        return yaml.safe_load(value) if value.strip().startswith("[") else [value]
    return value


class BiasModelsConfig(Section):
    probes: Annotated[list[str], BeforeValidator(_spec_list)] = Field(min_length=1)  # models under test, every one in the same run: open_clip:NAME@TAG | hf:ID_OR_DIR | py:module:factory | ...; on the command line models.probes=[A,B]


class BiasSection(Section):
    objects: list[Annotated[int, Field(ge=2, le=5)]] = Field(default_factory=lambda: [2, 3, 4, 5], min_length=1)  # object counts of the multi-object scenes
    scenes: int = Field(default=250, ge=2)  # scenes per object count
    orders: int = Field(default=24, ge=1)  # captions per scene naming its objects in different orders, at most (all orders when there are fewer; else whole rotations, so every object is named at every position equally often)
    vocabulary: list[str] | None = None  # objects as "colour shape" (e.g. "red circle"); None = every colour x shape of the scene generator
    areas: list[Annotated[float, Field(gt=0, lt=0.2)]] = Field(default_factory=lambda: [0.06, 0.0375, 0.0234, 0.0146, 0.0092], min_length=5, max_length=5)  # area an object covers per size rank, largest first, fraction of the image (each shape drawn at the diameter that gives it)
    single_area: float = Field(default=0.05, gt=0, lt=0.5)  # area the object covers in the single-object images, fraction of the image
    background: str = "grey"  # plain background colour of every probe image (a scene generator background name)
    distractors: int = Field(default=99, ge=1)  # matching: captions of other scenes with the same object count set against the true one, at most
    forward_rows: int = Field(default=64, ge=1)  # captions per text-encoder forward pass, fixed (last one padded) so embeddings do not depend on Ray's batching


class BiasConfig(Section):
    models: BiasModelsConfig
    output: str  # the run directory (local path or s3:// gs:// URI); the probe set is written into it
    seed: int = 0  # seed for the probe set and every tie-break
    embed: EmbedConfig = EmbedConfig()
    report: ReportConfig = ReportConfig()
    ray: RayConfig = RayConfig()
    bias: BiasSection = BiasSection()
    rows_per_block: int = Field(default=256, ge=1)  # probe images per input shard (one Ray block, one resume unit)

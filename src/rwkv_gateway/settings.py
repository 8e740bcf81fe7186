"""The one settings object: every option of the service, from `RWKV_GATEWAY_*` variables or the CLI.

Only this module (and the engine's environment setup for the `rwkv` package) reads `os.environ`.
Settings are built once by the composition root and passed explicitly to whatever needs them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Strategy strings the `rwkv` package accepts ("cuda fp16", "cpu fp32", "cuda fp16i8 *10 -> cpu fp32").
STRATEGY_RE = re.compile(
    r"^(?:(?:^|->) *(?:cuda(?::[\d]+)?|cpu|mps|dml) (?:fp(?:16|32)|bf16)(?:i8|i4|i3)?(?: \*[\d]+\+?)? *)+$"
)
#: RWKV-7 models in the `rwkv` package take only a single "device dtype" pair.
V7_STRATEGY_RE = re.compile(r"^(?:cuda(?::\d+)?|cpu) (?:fp16|fp32|bf16)$")


class Settings(BaseSettings):
    """Everything configurable. CLI options override environment variables, which override defaults."""

    model_config = SettingsConfigDict(env_prefix="RWKV_GATEWAY_", extra="ignore", validate_default=True)

    # Model
    model: str | None = Field(
        default=None,
        description="RWKV checkpoint: a .pth path, or hf://OWNER/REPO/PATH.pth[@REVISION] from a Hugging "
        "Face hub; none serves the demo model",
    )
    strategy: str = Field(default="cpu fp32", description='rwkv package strategy, e.g. "cuda fp16"')
    tokenizer: Path | None = Field(default=None, description="tokenizers JSON for Pile-vocabulary models")
    model_name: str | None = Field(default=None, description="model id shown to clients (default: file stem)")
    backend: Literal["auto", "package", "batched"] = Field(
        default="auto", description="auto: the batched backend for RWKV-7, the rwkv package otherwise"
    )
    jit: bool = Field(default=True, description="RWKV_JIT_ON for the rwkv package")
    cuda_kernels: bool = Field(
        default=False,
        description="RWKV_CUDA_ON: build the rwkv package's CUDA kernels (for models the package serves; "
        "the batched RWKV-7 backend has none)",
    )
    demo_layers: int = Field(default=2, ge=1, le=64)
    demo_embd: int = Field(default=128, ge=64, le=4096)

    # Server
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    data_dir: Path = Path("./data")
    db_url: str | None = Field(default=None, description="SQLAlchemy async URL (default: SQLite in data dir)")
    db_pool_size: int = Field(default=5, ge=1, description="database connections kept open per replica")
    db_max_overflow: int = Field(default=10, ge=0, description="extra connections opened under load")
    db_pool_timeout_s: float = Field(
        default=30.0, gt=0, description="how long a request waits for a free connection"
    )
    db_connect_timeout_s: float = Field(default=5.0, gt=0, description="PostgreSQL: connecting may take")
    db_statement_timeout_s: float = Field(
        default=30.0, ge=0, description="PostgreSQL: one statement may take (0: no limit)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_body_bytes: int = Field(default=4 * 2**20, ge=1024, description="largest request body accepted")
    cors_origins: list[str] = Field(
        default_factory=list, description='CORS origins for /v1/* (["*"] for any)'
    )

    # Chat prompts (shared by the chat-shaped dialects)
    chat_system_label: str = Field(default="System", min_length=1)
    chat_user_label: str = Field(default="User", min_length=1)
    chat_assistant_label: str = Field(default="Assistant", min_length=1)
    chat_collapse_blank_lines: bool = True
    chat_stop_on_blank_line: bool = False
    chat_template: Literal["auto", "world", "g-series"] = Field(
        default="auto",
        description="chat template: auto picks g-series (think modes) for rwkv7-g* checkpoints, "
        "world otherwise",
    )
    default_max_tokens: int = Field(
        default=1024, ge=1, description="max_tokens when a chat request sets none"
    )
    default_reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        default=None,
        description="OpenAI reasoning_effort when a chat request sets none (G-series models; unset: no "
        "think block)",
    )
    glm_wenxin_think: Literal["off", "fake", "short", "think", "long"] = Field(
        default="fake",
        description="G-series think mode of the ChatGLM and wenxin dialects, which have no reasoning "
        "field: fake answers at once; short/think/long think first and the think block is left out of "
        "the reply; off uses the plain World prompt",
    )

    # Baidu wenxinworkshop dialect (/oauth/2.0/token, /rpc/2.0/ai_custom/v1/wenxinworkshop/chat/{api_name})
    wenxin_api_names: list[str] = Field(
        default_factory=lambda: ["rwkv"],
        min_length=1,
        description='chat api_name values served by the loaded model (JSON list, e.g. ["rwkv", "ernie"])',
    )
    wenxin_token_ttl_s: int = Field(
        default=2_592_000, ge=1, description="lifetime of /oauth/2.0/token access tokens (Baidu: 30 days)"
    )
    wenxin_signature_skew_s: int = Field(
        default=300, ge=0, description="how far in the future a bce-auth-v1 timestamp may lie"
    )
    wenxin_max_content_chars: int = Field(
        default=4800, ge=1, description="total characters of a chat request's messages (and system)"
    )

    # ChatGLM-style API (/chat, /chat-stream, /embedding and the GLM shape of /tokenize)
    glm_model_name: str | None = Field(
        default=None, description="`model` in ChatGLM-style responses (default: the served model id)"
    )
    glm_ping_s: float = Field(default=15.0, gt=0, description="keep-alive comment interval on /chat-stream")

    # Operations (logs, metrics, shutdown)
    log_format: Literal["text", "json"] = Field(
        default="text", description="text lines, or one JSON object per line (ts, level, logger, message)"
    )
    log_prompts: bool = Field(default=False, description="allow prompt and reply text in log lines")
    drain_timeout_s: float = Field(
        default=30.0, ge=0, description="on SIGTERM, how long in-flight requests may run before the exit"
    )

    # Engine
    queue_size: int = Field(default=256, ge=1, description="requests waiting for a batch slot")
    max_batch_size: int = Field(default=32, ge=1, le=1024, description="sequences advanced together")
    prefill_chunk: int = Field(default=128, ge=1, le=8192, description="prompt tokens per sequence per step")
    prefill_budget: int = Field(default=512, ge=1, description="prompt tokens across all sequences per step")
    prefill_priority_s: float = Field(
        default=0.5,
        ge=0,
        le=60,
        description="prompt chunks run before decoding rows for at most this long at a time (0: together)",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="intra-op threads of the model thread (default: one per core)",
    )
    sample_threads: int | None = Field(
        default=None,
        ge=0,
        le=1024,
        description="threads sampling beside the model thread (default: torch_threads - 1)",
    )
    state_cache_mb: int = Field(default=1024, ge=0, description="RAM budget for cached state snapshots")
    live_state_mb: int = Field(
        default=0, ge=0, description="memory for the running sequences' states (0: max_batch_size decides)"
    )
    prefix_cache: bool = Field(default=True, description="continue prompts from cached prefix states")
    request_timeout_s: float = Field(default=600.0, gt=0)
    max_prompt_tokens: int = Field(default=32768, ge=1)
    max_new_tokens: int = Field(default=4096, ge=1, description="upper bound for any request's max_tokens")

    # Task API (/v1/tasks)
    task_tmp_idle_s: float = Field(
        default=600.0, gt=0, description="temporary (TMP_) tasks unused this long are evicted"
    )
    task_tmp_max: int = Field(
        default=1024, ge=1, description="most temporary tasks kept; the least recently used go first"
    )
    task_cache_size: int = Field(
        default=256, ge=1, description="persistent tasks and templates kept in RAM (all stay in the database)"
    )
    task_sweep_s: float = Field(default=30.0, gt=0, description="how often idle temporary tasks are evicted")

    # Role-play API (/login, /characters/*, /chat/*, /debug/token)
    roleplay_cors_origins: list[str] = Field(
        default_factory=lambda: ["*"],
        description='CORS origins for the role-play routes (["*"] echoes any origin; the UI runs on :9000)',
    )
    roleplay_guest_ttl_s: float = Field(
        default=86400.0, gt=0, description="guests idle this long are deleted with all their data"
    )
    roleplay_guest_sweep_s: float = Field(default=600.0, gt=0, description="how often idle guests are swept")
    roleplay_default_characters: Path | None = Field(
        default=None,
        description="folder of character JSON files given to new users (default: the bundled one)",
    )
    roleplay_max_avatar_bytes: int = Field(
        default=2**20, ge=0, description="largest avatar data URL accepted"
    )
    roleplay_max_reply_tokens: int = Field(
        default=512, ge=1, le=4096, description="tokens per role-play reply"
    )
    ui_dir: Path | None = Field(default=None, description="a built role-play UI (dist/) served at / for GET")

    @field_validator("strategy")
    @classmethod
    def _strategy_syntax(cls, value: str) -> str:
        value = " ".join(value.split())
        if not STRATEGY_RE.match(value):
            raise ValueError(
                f'invalid strategy {value!r}: expected e.g. "cpu fp32", "cuda fp16", "cuda fp16i8"'
            )
        return value

    @field_validator("model", "tokenizer", mode="before")
    @classmethod
    def _empty_path_is_none(cls, value: object) -> object:
        # `RWKV_GATEWAY_MODEL=` (as compose passes an unset `${RWKV_GATEWAY_MODEL:-}`) means "none",
        # not the current directory.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("model", mode="before")
    @classmethod
    def _model_path_as_text(cls, value: object) -> object:
        # A string, not a Path: `Path("hf://a/b")` would fold the scheme's `//` into one slash.
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @model_validator(mode="after")
    def _budget_covers_chunk(self) -> Settings:
        if self.prefill_budget < self.prefill_chunk:
            self.prefill_budget = self.prefill_chunk
        return self

    @property
    def state_dir(self) -> Path:
        return self.data_dir / "states"

    @property
    def database_url(self) -> str:
        if self.db_url:
            return self.db_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'gateway.db').resolve()}"

    @property
    def demo_model_path(self) -> Path:
        return self.data_dir / "demo" / f"rwkv7-demo-L{self.demo_layers}-D{self.demo_embd}.pth"

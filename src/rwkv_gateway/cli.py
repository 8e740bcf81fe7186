"""The `rwkv-gateway` command: serve, write a demo checkpoint, manage the database and the API keys.

Every option is also a `RWKV_GATEWAY_*` environment variable (the Settings object reads them); an
option given on the command line wins. Errors a user can fix print one line and exit non-zero.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn, TypeVar, cast

import typer
from pydantic import ValidationError

from rwkv_gateway.errors import GatewayError
from rwkv_gateway.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from rwkv_gateway.services.credentials import CredentialKind, CredentialService
    from rwkv_gateway.services.users import UserService

T = TypeVar("T")

app = typer.Typer(
    name="rwkv-gateway",
    help="Serve one RWKV model behind the OpenAI, wenxinworkshop, ChatGLM, role-play and Task APIs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database migrations (acts on the same database as `serve`).", no_args_is_help=True)
app.add_typer(db_app, name="db")
keys_app = typer.Typer(
    help="API credentials: OpenAI keys and Baidu AK/SK pairs (same database as `serve`).",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")
users_app = typer.Typer(
    help="Role-play accounts: add, list, delete, import a legacy deployment (same database as `serve`).",
    no_args_is_help=True,
)
app.add_typer(users_app, name="users")

DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="data directory [env RWKV_GATEWAY_DATA_DIR]")
]
DbUrlOpt = Annotated[
    str | None, typer.Option("--db-url", help="SQLAlchemy async URL (default: SQLite in the data dir)")
]


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _settings(**overrides: Any) -> Settings:
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        _fail(f"{where}: {first['msg']}")


def _setup_logging(level: str, fmt: Literal["text", "json"] = "text") -> None:
    from rwkv_gateway.logs import configure_logging

    configure_logging(level, fmt)


@app.command()
def serve(
    model: Annotated[
        str | None,
        typer.Option(
            help="RWKV checkpoint: a .pth path or hf://OWNER/REPO/PATH.pth[@REVISION] (omitted: demo model)"
        ),
    ] = None,
    strategy: Annotated[str | None, typer.Option(help='rwkv strategy, e.g. "cpu fp32", "cuda fp16"')] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="tokenizers JSON (Pile-vocabulary models)")] = None,
    host: Annotated[str | None, typer.Option(help="bind address [127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="port [8000]")] = None,
    data_dir: DataDirOpt = None,
    db_url: DbUrlOpt = None,
    model_name: Annotated[str | None, typer.Option(help="model id shown to clients")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error")] = None,
    log_format: Annotated[
        str | None, typer.Option(help="text, or json (one object per line) [env RWKV_GATEWAY_LOG_FORMAT]")
    ] = None,
    ui_dir: Annotated[
        Path | None, typer.Option("--ui-dir", help="a built role-play UI (its dist/ folder) served at /")
    ] = None,
) -> None:
    """Run the HTTP server (migrates the database first; loads the model in the background)."""
    from rwkv_gateway.app import create_app, services_of
    from rwkv_gateway.engine.hub import is_hub_spec
    from rwkv_gateway.engine.loader import preflight
    from rwkv_gateway.engine.runtime import resolve_model_path
    from rwkv_gateway.engine.tokenizer import load_tokenizer
    from rwkv_gateway.server import build_server

    settings = _settings(
        model=model,
        strategy=strategy,
        tokenizer=tokenizer,
        host=host,
        port=port,
        data_dir=data_dir,
        db_url=db_url,
        model_name=model_name,
        log_level=log_level,
        log_format=log_format,
        ui_dir=ui_dir,
    )
    if settings.ui_dir is not None and not (settings.ui_dir / "index.html").is_file():
        _fail(f"--ui-dir {settings.ui_dir} has no index.html (give the UI build's dist/ folder)")
    _setup_logging(settings.log_level, settings.log_format)
    try:
        if is_hub_spec(settings.model):
            # Downloaded before the server starts, as `pull` would: a failure is one error line and
            # an exit status, and the load in the background finds a local file
            # (docs/models.md#models-from-a-hub).
            settings = settings.model_copy(update={"model": str(_pull(cast(str, settings.model)))})
        path, _ = resolve_model_path(settings)
        info = preflight(path, settings.strategy)
        if settings.tokenizer is not None:
            load_tokenizer(settings.tokenizer, info.vocab_size)
    except GatewayError as exc:
        _fail(exc.message)
    fastapi_app = create_app(settings)
    server = build_server(fastapi_app, settings)

    def on_load_failure() -> None:
        server.should_exit = True

    slot = services_of(fastapi_app).model
    slot.on_load_failure = on_load_failure
    server.run()
    if slot.load_error:
        _fail(slot.load_error, code=1)


def _pull(spec: str) -> Path:
    """The local checkpoint for a hub spec (downloaded or resumed); a GatewayError propagates."""
    from rwkv_gateway.engine.hub import resolve_model

    try:
        return resolve_model(spec)
    except KeyboardInterrupt:
        _fail("interrupted: the next pull or serve of the same file resumes the download", code=130)


@app.command()
def pull(
    spec: Annotated[str, typer.Argument(help="hf://OWNER/REPO/PATH.pth, optionally @REVISION")],
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info",
) -> None:
    """Download a checkpoint from the Hugging Face hub (or the mirror in HF_ENDPOINT) into the hub cache
    (HF_HOME), resuming an interrupted download, and print its local path."""
    from rwkv_gateway.engine.hub import is_hub_spec

    if log_level not in ("debug", "info", "warning", "error"):
        _fail(f"--log-level must be debug, info, warning or error, not {log_level!r}")
    if not is_hub_spec(spec):
        _fail(f"pull takes a hub spec, hf://OWNER/REPO/PATH.pth[@REVISION], not {spec!r}")
    _setup_logging(log_level)
    try:
        path = _pull(spec)
    except GatewayError as exc:
        _fail(exc.message, code=1)
    typer.echo(str(path))


@app.command("demo-model")
def demo_model(
    out: Annotated[Path, typer.Argument(help="where to write the checkpoint (.pth)")],
    arch: Annotated[str, typer.Option(help="v7 or v4")] = "v7",
    layers: Annotated[int, typer.Option(min=1, max=64)] = 2,
    embd: Annotated[int, typer.Option(min=64, max=8192, help="width (a multiple of 64 for v7)")] = 128,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Write a random-weight RWKV checkpoint in the layout the rwkv package loads (World vocabulary)."""
    from rwkv_gateway.engine.demo_model import write_demo_model

    if arch not in ("v7", "v4"):
        _fail(f"--arch must be v7 or v4, not {arch!r}")
    try:
        path = write_demo_model(out, arch, n_layer=layers, n_embd=embd, seed=seed)  # type: ignore[arg-type]
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    typer.echo(
        f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, RWKV {arch}, {layers} layers, {embd} wide)"
    )


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="target revision")] = "head",
    data_dir: DataDirOpt = None,
    db_url: DbUrlOpt = None,
) -> None:
    """Apply pending migrations."""
    from rwkv_gateway.db.migrate import current_revision, upgrade

    settings = _settings(data_dir=data_dir, db_url=db_url)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        upgrade(settings.database_url, revision)
    except Exception as exc:
        _fail(f"migration failed: {exc}", code=1)
    typer.echo(f"database at revision {current_revision(settings.database_url)}")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help='target revision ("base" empties the database)')],
    data_dir: DataDirOpt = None,
    db_url: DbUrlOpt = None,
) -> None:
    """Revert migrations down to REVISION."""
    from rwkv_gateway.db.migrate import current_revision, downgrade

    settings = _settings(data_dir=data_dir, db_url=db_url)
    try:
        downgrade(settings.database_url, revision)
    except Exception as exc:
        _fail(f"migration failed: {exc}", code=1)
    typer.echo(f"database at revision {current_revision(settings.database_url)}")


@db_app.command("current")
def db_current(data_dir: DataDirOpt = None, db_url: DbUrlOpt = None) -> None:
    """Print the database's revision."""
    from rwkv_gateway.db.migrate import current_revision

    settings = _settings(data_dir=data_dir, db_url=db_url)
    typer.echo(current_revision(settings.database_url) or "empty (no migrations applied)")


KindOpt = Annotated[str, typer.Option("--kind", help="openai or baidu")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output on stdout")]


def _kind(value: str) -> CredentialKind:
    if value not in ("openai", "baidu"):
        _fail(f"--kind must be openai or baidu, not {value!r}")
    return cast("CredentialKind", value)


def _with_sessions(
    data_dir: Path | None,
    db_url: str | None,
    call: Callable[[async_sessionmaker[AsyncSession], Settings], Awaitable[T]],
) -> T:
    """Bring the database up to date, then return what `call` does with a session factory on it (the
    database engine is disposed of afterwards); a GatewayError ends the command with its message."""
    from rwkv_gateway.db.migrate import upgrade
    from rwkv_gateway.db.session import create_db_engine, make_session_factory

    # No mkdir of the data dir: with --db-url it is not used, and a SQLite file's directory is made
    # by the engine.
    settings = _settings(data_dir=data_dir, db_url=db_url)
    try:
        # Synchronous, with its own event loop: it must run before asyncio.run below, not inside it.
        upgrade(settings.database_url)
    except Exception as exc:
        _fail(f"migration failed: {exc}", code=1)

    async def run() -> T:
        engine = create_db_engine(settings.database_url)
        try:
            return await call(make_session_factory(engine), settings)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(run())
    except GatewayError as exc:
        _fail(exc.message, code=1)


def _with_credentials(
    data_dir: Path | None, db_url: str | None, call: Callable[[CredentialService], Awaitable[T]]
) -> T:
    """What `call` does with a CredentialService on the up-to-date database."""
    from rwkv_gateway.db.session import SqlStorage
    from rwkv_gateway.services.credentials import CredentialService

    return _with_sessions(data_dir, db_url, lambda sessions, _: call(CredentialService(SqlStorage(sessions))))


@keys_app.command("create")
def keys_create(
    kind: KindOpt,
    name: Annotated[str | None, typer.Option("--name", help="a label to tell credentials apart")] = None,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
    db_url: DbUrlOpt = None,
) -> None:
    """Make an OpenAI API key or a Baidu AK/SK pair and print it (the only time the secret is shown)."""
    checked = _kind(kind)
    created = _with_credentials(data_dir, db_url, lambda service: service.create(checked, name))
    if as_json:
        out = {"api_key": created.api_key}
        if created.secret_key is not None:
            out["secret_key"] = created.secret_key
        typer.echo(json.dumps(out))
        return
    label = f" ({created.name})" if created.name else ""
    typer.echo(f"created {created.kind} credential {created.id}{label}")
    typer.echo(f"api_key:    {created.api_key}")
    if created.secret_key is not None:
        typer.echo(f"secret_key: {created.secret_key}")
    typer.echo("store it now: the secret cannot be shown again", err=True)


@keys_app.command("list")
def keys_list(
    kind: Annotated[str | None, typer.Option("--kind", help="only openai or only baidu")] = None,
    include_revoked: Annotated[bool, typer.Option("--all", help="include revoked credentials")] = False,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
    db_url: DbUrlOpt = None,
) -> None:
    """List credentials: id, kind, key prefix or AK, name, dates (never a secret)."""
    checked = None if kind is None else _kind(kind)
    infos = _with_credentials(
        data_dir, db_url, lambda service: service.list(checked, include_revoked=include_revoked)
    )
    if as_json:
        rows = [
            {
                "id": info.id,
                "kind": info.kind,
                "key": info.display,
                "name": info.name,
                "created_at": info.created_at.isoformat(),
                "revoked_at": info.revoked_at.isoformat() if info.revoked_at else None,
            }
            for info in infos
        ]
        typer.echo(json.dumps(rows))
        return
    if not infos:
        typer.echo("no credentials", err=True)
        return
    typer.echo(f"{'ID':>4}  {'KIND':<6}  {'KEY':<24}  {'CREATED (UTC)':<19}  {'STATUS':<7}  NAME")
    for info in infos:
        status = "active" if info.active else "revoked"
        created = info.created_at.strftime("%Y-%m-%d %H:%M:%S")
        typer.echo(
            f"{info.id:>4}  {info.kind:<6}  {info.display:<24}  {created:<19}  {status:<7}  {info.name}"
        )


@keys_app.command("revoke")
def keys_revoke(
    identifier: Annotated[
        str, typer.Argument(help="the id, the full OpenAI key, its listed prefix, or the Baidu AK")
    ],
    data_dir: DataDirOpt = None,
    db_url: DbUrlOpt = None,
) -> None:
    """Revoke a credential and every access token issued for it."""
    if not _with_credentials(data_dir, db_url, lambda service: service.revoke(identifier)):
        _fail(f"no active credential matches {identifier!r}", code=1)
    typer.echo(f"revoked {identifier}")


# ---------------------------------------------------------------------------- role-play users


def _with_users(data_dir: Path | None, db_url: str | None, call: Callable[[UserService], Awaitable[T]]) -> T:
    """What `call` does with a UserService on the up-to-date database."""
    from rwkv_gateway.db.session import SqlStorage
    from rwkv_gateway.services.users import UserService

    return _with_sessions(
        data_dir,
        db_url,
        lambda sessions, settings: call(
            UserService(SqlStorage(sessions), defaults_dir=settings.roleplay_default_characters)
        ),
    )


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="the user name (what the UI's login form asks for)")],
    password: Annotated[
        str | None, typer.Option("--password", help="the password (prompted for when omitted)")
    ] = None,
    data_dir: DataDirOpt = None,
    db_url: DbUrlOpt = None,
) -> None:
    """Create a role-play account (the password is stored as an Argon2id hash)."""
    if password is None:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    secret = password
    _with_users(data_dir, db_url, lambda users: users.add(name, secret))
    typer.echo(f"added user {name}")


@users_app.command("list")
def users_list(
    guests: Annotated[bool, typer.Option("--guests", help="include guest accounts")] = False,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
    db_url: DbUrlOpt = None,
) -> None:
    """List role-play accounts with their character counts."""
    infos = _with_users(data_dir, db_url, lambda users: users.list(guests=guests))
    if as_json:
        rows = [
            {
                "name": i.name,
                "created_at": i.created_at.isoformat(),
                "last_seen_at": i.last_seen_at.isoformat(),
                "characters": i.characters,
            }
            for i in infos
        ]
        typer.echo(json.dumps(rows, ensure_ascii=False))
        return
    if not infos:
        typer.echo("no users", err=True)
        return
    typer.echo(f"{'NAME':<40}  {'CREATED (UTC)':<19}  {'LAST SEEN (UTC)':<19}  CHARACTERS")
    for i in infos:
        created = i.created_at.strftime("%Y-%m-%d %H:%M:%S")
        seen = i.last_seen_at.strftime("%Y-%m-%d %H:%M:%S")
        typer.echo(f"{i.name:<40}  {created:<19}  {seen:<19}  {i.characters}")


@users_app.command("del")
def users_del(
    name: Annotated[str, typer.Argument(help="the user to delete, with all their characters and chats")],
    data_dir: DataDirOpt = None,
    db_url: DbUrlOpt = None,
) -> None:
    """Delete a role-play account and everything it owns (characters, chats, their saved states)."""
    keys = _with_users(data_dir, db_url, lambda users: users.delete(name))
    if keys:
        from rwkv_gateway.engine.states import StateStore

        settings = _settings(data_dir=data_dir, db_url=db_url)
        # Deleting by key needs no model; the id only matters when loading states.
        store = StateStore(settings.state_dir, budget_bytes=0, model_id="")
        for key in keys:
            store.delete(key)
    typer.echo(f"deleted user {name}")


@users_app.command("import-legacy")
def users_import_legacy(
    directory: Annotated[
        Path, typer.Argument(help="an RWKV_Role_Playing_API folder (with user/ and chars/)")
    ],
    data_dir: DataDirOpt = None,
    db_url: DbUrlOpt = None,
) -> None:
    """Import the original API's accounts (user/<name> password files) and character JSON files."""
    names, n_chars = _with_users(data_dir, db_url, lambda users: users.import_legacy(directory))
    typer.echo(f"imported {len(names)} users ({', '.join(names) or 'none'}) and {n_chars} characters")


def main() -> None:
    app()

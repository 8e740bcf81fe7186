"""The Alembic migrations: the environment (`env.py`), the revision template and `versions/`.

They live at the repository root next to `alembic.ini`, which points here. The wheel and the editable
install map this directory onto the package `rwkv_gateway.migrations` (pyproject.toml's package-dir),
which is where the service finds them to upgrade its database on start (`rwkv_gateway.db.migrate`).
Nothing imports these modules: Alembic loads `env.py` and the revisions by path.
"""

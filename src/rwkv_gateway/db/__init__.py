"""Persistence: ORM tables, the async engine and session factory, repositories and schema migrations.

The only package (with the Alembic migrations, `migrations/` at the repository root) that imports
SQLAlchemy; services get sessions from `session.make_session_factory` and use the repositories in
`repo`, which only flush.
"""

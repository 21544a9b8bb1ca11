"""Pull the collected samples: pages of ``/api/samples`` from a gateway, or rows straight from its database."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from edgecore.clikit import TOKEN_ENV
from edgecore.samples import Sample, SampleError, SamplePage

from .errors import RefreshError


def load_samples(source: str, *, token: str | None = None, device: str | None = None,
                 page_size: int = 500) -> list[Sample]:
    """Every collected sample at ``source`` (gateway URL, database URL or SQLite path), oldest first."""
    if source.startswith(("http://", "https://")):
        return _from_gateway(source, token=token, device=device, page_size=page_size)
    return _from_database(source, device=device)


def _from_gateway(url: str, *, token: str | None, device: str | None, page_size: int) -> list[Sample]:
    out: list[Sample] = []
    after: int | None = 0
    while after is not None:
        q = {"after": after, "limit": page_size, **({"device": device} if device else {})}
        req = urllib.request.Request(f"{url.rstrip('/')}/api/samples?{urllib.parse.urlencode(q)}",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                page = SamplePage.from_json(json.loads(r.read()))
        except urllib.error.HTTPError as e:
            hint = f" (give the gateway's token: --token or ${TOKEN_ENV})" if e.code in (401, 403) else ""
            raise RefreshError(f"gateway {url} refused the samples request: HTTP {e.code}{hint}") from e
        except (urllib.error.URLError, OSError) as e:
            raise RefreshError(f"cannot reach gateway {url}: {getattr(e, 'reason', e)}") from e
        except (ValueError, SampleError) as e:
            raise RefreshError(f"gateway {url} answered something that is not a samples page: {e}") from e
        out += page.samples
        after = page.next_after
    return out


def _from_database(spec: str, *, device: str | None) -> list[Sample]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    url = spec if "://" in spec else f"sqlite:///{Path(spec).resolve()}"
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite") and not Path(url.split("sqlite:///", 1)[-1]).is_file():
        raise RefreshError(f"no gateway database at {spec}")
    try:
        engine = create_engine(url)
        with engine.connect() as c:
            q = "SELECT * FROM samples" + (" WHERE device_id = :d" if device else "") + " ORDER BY id"
            rows = [dict(r) for r in c.execute(text(q), {"d": device} if device else {}).mappings()]
    except (SQLAlchemyError, ImportError) as e:
        raise RefreshError(f"cannot read collected samples from {spec}: {str(e).splitlines()[0]}") from e
    try:
        return [Sample.from_row(r) for r in rows]
    except SampleError as e:
        raise RefreshError(f"{spec}: {e}") from e

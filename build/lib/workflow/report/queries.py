"""The named queries of queries.sql (beside this file) and the read-only database they run against."""
from __future__ import annotations

import re
from pathlib import Path

QUERIES_PATH = Path(__file__).with_name("queries.sql")


def load_queries(path: Path = QUERIES_PATH) -> dict[str, str]:
    """The named sections ("-- name: key") of queries.sql."""
    queries, name, lines = {}, None, []
    for line in path.read_text().splitlines():
        match = re.match(r"--\s*name:\s*(\w+)", line)
        if match:
            if name:
                queries[name] = "\n".join(lines).strip()
            name, lines = match.group(1), []
        elif name:
            lines.append(line)
    if name:
        queries[name] = "\n".join(lines).strip()
    return queries


class Db:
    """Runs the named queries; rows come back as dicts."""

    def __init__(self, con, queries: dict[str, str]):
        self.con, self.queries = con, queries

    def rows(self, name: str, *params) -> list[dict]:
        cur = self.con.execute(self.queries[name], list(params))
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]

    def one(self, name: str, *params) -> dict:
        rows = self.rows(name, *params)
        return rows[0] if rows else {}


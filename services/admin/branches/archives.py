"""What an uploaded archive must be before Restore runs anything from it.

An archive is SQL that pg_restore executes: a table's CHECK constraint can
call a function the archive defines, and that function runs while the rows
load. So Restore accepts only what this deployment could have produced, and
runs even that with no privilege outside the new database:

- **Signed.** Backup signs every archive with HMAC-SHA256 under a key derived
  from ``STRATA_INTERNAL_SECRET`` (its last message carries the signature);
  Restore requires a matching signature, checked over the whole upload before
  pg_restore starts.
- **Vetted.** ``pg_restore --list`` names every entry: each must be of a kind
  Strata's own backups contain, an extension must be one Strata uses (the
  owner creates it; the archive's own statement is skipped), and a function
  must be one the live database defines in Strata's schemas.
- **Unprivileged.** The restore connects as a role of its own (no superuser,
  no BYPASSRLS, member of nothing, so no ``pg_execute_server_program``) that
  owns the new database and nothing else (:mod:`.backups`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass

from shared.api.errors import Code, StrataError

__all__ = ["ALLOWED_EXTENSIONS", "STRATA_SCHEMAS", "ArchiveSigner", "TocEntry", "parse_toc", "vet"]

# The extensions Strata's databases have (pgvector, and the statement statistics admin reads).
ALLOWED_EXTENSIONS = frozenset({"vector", "pg_stat_statements"})
STRATA_SCHEMAS = frozenset({"kv", "tenants", "vector", "admin"})
# Every kind of entry pg_dump writes for a Strata database (the header entries included).
_ALLOWED_KINDS = frozenset(
    {
        "ENCODING",
        "STDSTRINGS",
        "SEARCHPATH",
        "SCHEMA",
        "EXTENSION",
        "COMMENT",
        "FUNCTION",
        "TABLE",
        "TABLE DATA",
        "SEQUENCE",
        "SEQUENCE OWNED BY",
        "SEQUENCE SET",
        "DEFAULT",
        "CONSTRAINT",
        "FK CONSTRAINT",
        "CHECK CONSTRAINT",
        "INDEX",
        "INDEX ATTACH",
        "POLICY",
        "ROW SECURITY",
        "ACL",
        "STATISTICS DATA",
    }
)
# Every kind pg_dump can write, longest first, so that "TABLE DATA" is not read as "TABLE".
_KINDS = sorted(
    _ALLOWED_KINDS
    | {
        "ACCESS METHOD",
        "AGGREGATE",
        "BLOB",
        "BLOB METADATA",
        "BLOBS",
        "CAST",
        "COLLATION",
        "CONVERSION",
        "DATABASE",
        "DATABASE PROPERTIES",
        "DEFAULT ACL",
        "EVENT TRIGGER",
        "FOREIGN DATA WRAPPER",
        "FOREIGN TABLE",
        "FOREIGN SERVER",
        "LARGE OBJECT",
        "MATERIALIZED VIEW",
        "MATERIALIZED VIEW DATA",
        "OPERATOR",
        "OPERATOR CLASS",
        "OPERATOR FAMILY",
        "PROCEDURAL LANGUAGE",
        "PROCEDURE",
        "PUBLICATION",
        "PUBLICATION TABLE",
        "PUBLICATION TABLES IN SCHEMA",
        "RULE",
        "SERVER",
        "SHELL TYPE",
        "STATISTICS",
        "SUBSCRIPTION",
        "SUBSCRIPTION TABLE",
        "TEXT SEARCH CONFIGURATION",
        "TEXT SEARCH DICTIONARY",
        "TEXT SEARCH PARSER",
        "TEXT SEARCH TEMPLATE",
        "TRANSFORM",
        "TRIGGER",
        "TYPE",
        "USER MAPPING",
        "VIEW",
    },
    key=len,
    reverse=True,
)
_ENTRY_RE = re.compile(r"(\d+); (\d+) (\d+) (.*)")
_MAX_REFUSED_NAMED = 5


class ArchiveSigner:
    """Signs archives as Backup makes them and checks the signature Restore is given."""

    def __init__(self, internal_secret: bytes) -> None:
        # A key of its own: a backup signature is never a valid identity signature, or the reverse.
        self._key = hmac.new(internal_secret, b"strata-backup-signature-v1", hashlib.sha256).digest()

    def start(self) -> hmac.HMAC:
        """A new signature, to be fed the archive's bytes in order."""
        return hmac.new(self._key, digestmod=hashlib.sha256)

    def check(self, signing: hmac.HMAC, signature: str) -> None:
        """INVALID_ARGUMENT unless ``signature`` is the one ``signing`` computed."""
        if not signature:
            raise StrataError(
                Code.INVALID_ARGUMENT,
                "BACKUP_NOT_SIGNED",
                "Restore takes only archives this deployment's Backup made: send the signature "
                "its last message carried",
            )
        if not hmac.compare_digest(signing.hexdigest(), signature):
            raise StrataError(
                Code.INVALID_ARGUMENT,
                "BACKUP_SIGNATURE_INVALID",
                "the archive's signature does not match: it was not made by this deployment's Backup, "
                "or it was changed since; nothing was restored",
            )


@dataclass(frozen=True, slots=True)
class TocEntry:
    """One line of ``pg_restore --list``."""

    line: str
    kind: str
    schema: str  # "-" when none
    name: str  # the object's name; for functions with their arguments; owner left out

    @property
    def function_name(self) -> str:
        return self.name.partition("(")[0]


def parse_toc(listing: str) -> list[TocEntry]:
    """The entries of a ``pg_restore --list`` listing (comment lines skipped).

    An entry reads ``id; tableoid oid KIND schema name owner``, where the
    kind and the name may hold spaces and the owner may be empty; an
    unknown kind is kept as "?" so that it is refused.
    """
    entries = []
    for line in listing.splitlines():  # trailing spaces kept: an empty owner is one
        match = _ENTRY_RE.fullmatch(line)
        if match is None:
            continue
        rest = match[4]
        kind = next((k for k in _KINDS if rest.startswith(k + " ")), "?")
        words = rest[len(kind) + 1 :].split(" ") if kind != "?" else ["-", rest, ""]
        if len(words) < 3:
            words = [*words, "", ""][:3]
        entries.append(TocEntry(line, kind, words[0], " ".join(words[1:-1])))
    return entries


def vet(entries: Iterable[TocEntry], live_functions: set[tuple[str, str]]) -> tuple[list[str], set[str]]:
    """The entries to restore (as a ``--use-list``) and the extensions to create first.

    ``live_functions`` is (schema, name) of every function the live database
    defines in Strata's schemas. INVALID_ARGUMENT ``ARCHIVE_NOT_ALLOWED``,
    naming what is refused, when anything is outside what Strata's own
    backups contain.
    """
    refused: list[str] = []
    keep: list[str] = []
    extensions: set[str] = set()
    for entry in entries:
        if entry.kind not in _ALLOWED_KINDS:
            refused.append(f"{entry.kind} {entry.schema}.{entry.name}")
        elif entry.kind == "EXTENSION":
            if entry.name in ALLOWED_EXTENSIONS:
                extensions.add(entry.name)  # created by the owner; the archive's statement is skipped
            else:
                refused.append(f"EXTENSION {entry.name}")
        elif entry.kind == "COMMENT" and entry.name.startswith("EXTENSION "):
            pass  # the extension's own comment comes with it
        elif entry.kind == "FUNCTION" and (entry.schema, entry.function_name) not in live_functions:
            refused.append(f"FUNCTION {entry.schema}.{entry.name}")
        elif entry.kind == "SCHEMA" and entry.name not in STRATA_SCHEMAS | {"public"}:
            refused.append(f"SCHEMA {entry.name}")
        else:
            keep.append(entry.line)
    if refused:
        shown = "; ".join(refused[:_MAX_REFUSED_NAMED])
        more = f" and {len(refused) - _MAX_REFUSED_NAMED} more" if len(refused) > _MAX_REFUSED_NAMED else ""
        raise StrataError(
            Code.INVALID_ARGUMENT,
            "ARCHIVE_NOT_ALLOWED",
            f"the archive holds what Strata's backups never contain: {shown}{more}; nothing was restored",
            metadata={"refused": str(len(refused)), "first": refused[0][:200]},
        )
    return keep, extensions

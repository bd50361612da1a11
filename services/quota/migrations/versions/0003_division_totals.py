"""division totals: the roll-up per division prefix and category, kept by triggers

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 17:45:00.000000

``division_totals`` holds, per GB/T 2260 code prefix of 2, 4 and 6 digits (province, city,
county) and category, the sums of approved, occupied and reserved places and the number of
establishment rows of the orgs whose division code starts with the prefix — exactly what
``GET /divisions/{code}/establishment`` summed over the subtree before — split into ``SHARDS``
parts by the last character of the org id and summed on read.

Triggers keep it in the writing transaction, so every write path (commands, slot requests,
merges, the org projection, a hand-made fix) keeps it without the handlers knowing:

- ``establishment`` insert / delete / update of the counts or of the key: the org's division is
  read from ``org_projection`` (``FOR SHARE`` on PostgreSQL, so a concurrent move of the org waits
  for this transaction, or this one reads the division the move committed) and the difference is
  added to the three prefix rows of its part;
- ``org_projection`` insert / delete / change of ``division_code`` (or of the key): the org's
  establishment rows are taken off the old prefixes and added to the new ones.

An establishment row of an org the projection does not know (or knows without a division) adds
nothing, as the join of the old roll-up did; it is added when the projection learns the division.

SQLite: ``batch_alter_table`` on ``establishment`` or ``org_projection`` in a later migration
recreates the table and drops its triggers; such a migration has to install them again.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SHARDS = 8
"""Parts per prefix and category (``services.quota.adapters.orm.DIVISION_TOTALS_SHARDS``)."""

_HEX = "'0123456789abcdef'"
_WIDTHS = "(SELECT 2 AS n UNION ALL SELECT 4 UNION ALL SELECT 6) AS w"
_COLUMNS = "prefix, category, shard, approved, occupied, reserved, orgs"


def shard_sql(dialect: str, org_id: str, shards: int = SHARDS) -> str:
    """The part an org id adds to: its last hexadecimal digit modulo ``shards`` (the same
    number in both dialects; a character that is no hexadecimal digit counts as 0)."""
    if dialect == "postgresql":
        return f"(position(lower(right({org_id}, 1)) in {_HEX}) % {shards})"
    return f"(instr({_HEX}, lower(substr({org_id}, -1))) % {shards})"


def _upsert_sqlite(select: str) -> str:
    # The WHERE of ``select`` keeps SQLite from reading ON CONFLICT as a join constraint.
    return (
        f"INSERT INTO division_totals ({_COLUMNS}) {select} "
        "ON CONFLICT (prefix, category, shard) DO UPDATE SET "
        "approved = approved + excluded.approved, occupied = occupied + excluded.occupied, "
        "reserved = reserved + excluded.reserved, orgs = orgs + excluded.orgs;"
    )


def _sqlite_establishment(
    org: str, category: str, sign: str, row: str | tuple[str, str, str], orgs: str
) -> str:
    """Add ``sign`` × the counts of ``row`` (``NEW``/``OLD``, or deltas) at the division of
    ``org``."""
    values = (
        f"{sign}({row[0]}), {sign}({row[1]}), {sign}({row[2]})"
        if isinstance(row, tuple)
        else f"{sign}{row}.approved, {sign}{row}.occupied, {sign}{row}.reserved"
    )
    return _upsert_sqlite(
        f"SELECT substr(p.division_code, 1, w.n), {category}, {shard_sql('sqlite', org)}, "
        f"{values}, {orgs} FROM org_projection AS p, {_WIDTHS} "
        f"WHERE p.org_id = {org} AND p.division_code IS NOT NULL "
        "AND length(p.division_code) >= w.n"
    )


def _sqlite_org(org: str, division: str, sign: str) -> str:
    """Add ``sign`` × every establishment row of ``org`` at ``division``."""
    return _upsert_sqlite(
        f"SELECT substr({division}, 1, w.n), e.category, {shard_sql('sqlite', 'e.org_id')}, "
        f"{sign}e.approved, {sign}e.occupied, {sign}e.reserved, {sign}1 "
        f"FROM establishment AS e, {_WIDTHS} "
        f"WHERE e.org_id = {org} AND {division} IS NOT NULL AND length({division}) >= w.n"
    )


def sqlite_triggers() -> list[str]:
    deltas = (
        "NEW.approved - OLD.approved",
        "NEW.occupied - OLD.occupied",
        "NEW.reserved - OLD.reserved",
    )
    return [
        "CREATE TRIGGER division_totals_establishment_insert AFTER INSERT ON establishment "
        "BEGIN " + _sqlite_establishment("NEW.org_id", "NEW.category", "", "NEW", "1") + " END",
        "CREATE TRIGGER division_totals_establishment_delete AFTER DELETE ON establishment "
        "BEGIN " + _sqlite_establishment("OLD.org_id", "OLD.category", "-", "OLD", "-1") + " END",
        "CREATE TRIGGER division_totals_establishment_update "
        "AFTER UPDATE OF approved, occupied, reserved ON establishment "
        "WHEN OLD.org_id = NEW.org_id AND OLD.category = NEW.category "
        "AND (OLD.approved <> NEW.approved OR OLD.occupied <> NEW.occupied "
        "OR OLD.reserved <> NEW.reserved) "
        "BEGIN " + _sqlite_establishment("NEW.org_id", "NEW.category", "", deltas, "0") + " END",
        "CREATE TRIGGER division_totals_establishment_rekey "
        "AFTER UPDATE OF org_id, category ON establishment "
        "WHEN OLD.org_id <> NEW.org_id OR OLD.category <> NEW.category "
        "BEGIN "
        + _sqlite_establishment("OLD.org_id", "OLD.category", "-", "OLD", "-1")
        + " "
        + _sqlite_establishment("NEW.org_id", "NEW.category", "", "NEW", "1")
        + " END",
        "CREATE TRIGGER division_totals_org_insert AFTER INSERT ON org_projection "
        "BEGIN " + _sqlite_org("NEW.org_id", "NEW.division_code", "") + " END",
        "CREATE TRIGGER division_totals_org_delete AFTER DELETE ON org_projection "
        "BEGIN " + _sqlite_org("OLD.org_id", "OLD.division_code", "-") + " END",
        "CREATE TRIGGER division_totals_org_update "
        "AFTER UPDATE OF org_id, division_code ON org_projection "
        "WHEN OLD.org_id <> NEW.org_id OR OLD.division_code IS NOT NEW.division_code "
        "BEGIN "
        + _sqlite_org("OLD.org_id", "OLD.division_code", "-")
        + " "
        + _sqlite_org("NEW.org_id", "NEW.division_code", "")
        + " END",
    ]


def postgresql_triggers(shards: int = SHARDS) -> list[str]:
    add = f"""
CREATE OR REPLACE FUNCTION division_totals_add(
    p_org varchar, p_division varchar, p_category varchar,
    p_approved integer, p_occupied integer, p_reserved integer, p_orgs integer
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_division IS NULL OR (p_approved = 0 AND p_occupied = 0 AND p_reserved = 0
                              AND p_orgs = 0) THEN
        RETURN;
    END IF;
    INSERT INTO division_totals AS t ({_COLUMNS})
    SELECT substr(p_division, 1, w.n), p_category, {shard_sql("postgresql", "p_org", shards)},
           p_approved, p_occupied, p_reserved, p_orgs
    FROM (VALUES (2), (4), (6)) AS w(n)
    WHERE length(p_division) >= w.n
    ORDER BY w.n
    ON CONFLICT (prefix, category, shard) DO UPDATE SET
        approved = t.approved + EXCLUDED.approved,
        occupied = t.occupied + EXCLUDED.occupied,
        reserved = t.reserved + EXCLUDED.reserved,
        orgs = t.orgs + EXCLUDED.orgs;
END $$"""
    on_establishment = """
CREATE OR REPLACE FUNCTION division_totals_on_establishment() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_division varchar;
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.org_id = NEW.org_id AND OLD.category = NEW.category THEN
        IF OLD.approved = NEW.approved AND OLD.occupied = NEW.occupied
           AND OLD.reserved = NEW.reserved THEN
            RETURN NULL;
        END IF;
        SELECT p.division_code INTO v_division FROM org_projection AS p
        WHERE p.org_id = NEW.org_id FOR SHARE;
        PERFORM division_totals_add(NEW.org_id, v_division, NEW.category,
            NEW.approved - OLD.approved, NEW.occupied - OLD.occupied,
            NEW.reserved - OLD.reserved, 0);
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        SELECT p.division_code INTO v_division FROM org_projection AS p
        WHERE p.org_id = OLD.org_id FOR SHARE;
        PERFORM division_totals_add(OLD.org_id, v_division, OLD.category,
            -OLD.approved, -OLD.occupied, -OLD.reserved, -1);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        v_division := NULL;
        SELECT p.division_code INTO v_division FROM org_projection AS p
        WHERE p.org_id = NEW.org_id FOR SHARE;
        PERFORM division_totals_add(NEW.org_id, v_division, NEW.category,
            NEW.approved, NEW.occupied, NEW.reserved, 1);
    END IF;
    RETURN NULL;
END $$"""
    on_org = """
CREATE OR REPLACE FUNCTION division_totals_on_org() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    e record;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.division_code IS NOT NULL THEN
        FOR e IN SELECT * FROM establishment WHERE org_id = OLD.org_id ORDER BY category LOOP
            PERFORM division_totals_add(e.org_id, OLD.division_code, e.category,
                -e.approved, -e.occupied, -e.reserved, -1);
        END LOOP;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.division_code IS NOT NULL THEN
        FOR e IN SELECT * FROM establishment WHERE org_id = NEW.org_id ORDER BY category LOOP
            PERFORM division_totals_add(e.org_id, NEW.division_code, e.category,
                e.approved, e.occupied, e.reserved, 1);
        END LOOP;
    END IF;
    RETURN NULL;
END $$"""
    return [
        add,
        on_establishment,
        on_org,
        "CREATE TRIGGER division_totals_establishment "
        "AFTER INSERT OR DELETE OR UPDATE OF org_id, category, approved, occupied, reserved "
        "ON establishment FOR EACH ROW EXECUTE FUNCTION division_totals_on_establishment()",
        "CREATE TRIGGER division_totals_org AFTER INSERT OR DELETE ON org_projection "
        "FOR EACH ROW EXECUTE FUNCTION division_totals_on_org()",
        "CREATE TRIGGER division_totals_org_update "
        "AFTER UPDATE OF org_id, division_code ON org_projection FOR EACH ROW "
        "WHEN (OLD.org_id IS DISTINCT FROM NEW.org_id "
        "OR OLD.division_code IS DISTINCT FROM NEW.division_code) "
        "EXECUTE FUNCTION division_totals_on_org()",
    ]


def drop_triggers(dialect: str) -> list[str]:
    if dialect == "postgresql":
        return [
            "DROP TRIGGER IF EXISTS division_totals_establishment ON establishment",
            "DROP TRIGGER IF EXISTS division_totals_org ON org_projection",
            "DROP TRIGGER IF EXISTS division_totals_org_update ON org_projection",
            "DROP FUNCTION IF EXISTS division_totals_on_establishment()",
            "DROP FUNCTION IF EXISTS division_totals_on_org()",
            "DROP FUNCTION IF EXISTS division_totals_add("
            "varchar, varchar, varchar, integer, integer, integer, integer)",
        ]
    return [
        f"DROP TRIGGER IF EXISTS division_totals_{name}"
        for name in (
            "establishment_insert",
            "establishment_delete",
            "establishment_update",
            "establishment_rekey",
            "org_insert",
            "org_delete",
            "org_update",
        )
    ]


def fill_sql(dialect: str, shards: int = SHARDS) -> str:
    """Totals of the rows there are now, at the three levels."""
    return (
        f"INSERT INTO division_totals ({_COLUMNS}) "
        "SELECT substr(p.division_code, 1, w.n), e.category, "
        f"{shard_sql(dialect, 'e.org_id', shards)}, "
        "sum(e.approved), sum(e.occupied), sum(e.reserved), count(*) "
        f"FROM establishment AS e JOIN org_projection AS p ON p.org_id = e.org_id, {_WIDTHS} "
        "WHERE p.division_code IS NOT NULL AND length(p.division_code) >= w.n "
        "GROUP BY 1, 2, 3"
    )


def upgrade() -> None:
    op.create_table(
        "division_totals",
        sa.Column("prefix", sa.String(length=6), nullable=False),
        sa.Column("category", sa.String(length=32), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("approved", sa.Integer(), nullable=False),
        sa.Column("occupied", sa.Integer(), nullable=False),
        sa.Column("reserved", sa.Integer(), nullable=False),
        sa.Column("orgs", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("prefix", "category", "shard", name="pk_division_totals"),
    )
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        # Few rows, updated by every write: leave room on each page for the new row versions
        # (HOT updates, pruned as the page is read) and vacuum after a fixed number of dead
        # versions rather than a share of a table this small.
        op.execute(
            "ALTER TABLE division_totals SET (fillfactor = 50, "
            "autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 2000, "
            "autovacuum_vacuum_cost_delay = 0)"
        )
    # Triggers first: on PostgreSQL creating them locks both tables against writers until the
    # migration commits, so the fill below sees every row and no write slips between the two.
    for statement in postgresql_triggers() if dialect == "postgresql" else sqlite_triggers():
        op.execute(statement)
    op.execute(fill_sql(dialect))


def downgrade() -> None:
    for statement in drop_triggers(op.get_bind().dialect.name):
        op.execute(statement)
    op.drop_table("division_totals")

"""MySQL and MariaDB: the claim of a row with limits in one round trip, a stored procedure; the
look for waiters that a finished limited run makes, another; and an index that counts a
concurrency key's taken slots.

``rt_claim_within_limits`` does what migration 0010's PostgreSQL function does, with the locks
``limits.claim`` takes on these databases (the keys' ``TaskLimiter`` rows), so that claims made
by the procedure and by Python exclude each other. Run with autocommit on (a worker's claim), it
is one transaction of its own; inside the caller's transaction it joins it, and its locks last
until the caller commits. MySQL refuses an UPDATE that reads its own table, so the key's slots
are counted first, under the key's lock, as ``limits.claim`` counts them. Its result set is one
row: the row's concurrency key ('' without one) when it won, else NULL (the caller then decides,
and defers, in Python).

``rt_free_slots_for_waiters`` is the first half of ``limits.wake``: under the key's lock, the
slots free for the key's WAITING rows (0 when none waits, the common case, and then nothing more
is sent). A deferring claim holds the same lock from its count to its commit, so a row it turns
WAITING is seen here.

These databases have no partial index: 0010's ``rt_task_waiters`` (concurrency_key, created_at)
holds every row of a key there, so counting the rows that waited read each older row of the key.
Here it becomes (concurrency_key, state, waiting_for, created_at), which answers both counts of
the slots from the index alone (its name is kept, so that the model's state stays true).

The limit keys (``concurrency_key``, ``rate_key``, ``TaskLimiter.key``) get a binary, no-pad
collation, as the unique key's column did in 0009: with the table's default, keys differing in
letter case or trailing spaces were one key. The procedures' key variables are declared with it,
so that comparisons with the columns do not mix collations.
"""

from django.db import migrations

#: What both procedures do once their variables are declared (``own_transaction``,
#: ``found_row``): a SELECT ... INTO that finds no row clears ``found_row``; an error rolls back
#: the transaction the procedure began, if it began one, and is raised to the caller.
_BEGIN = """    DECLARE CONTINUE HANDLER FOR NOT FOUND SET found_row = FALSE;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION
    BEGIN
        IF own_transaction THEN
            ROLLBACK;
        END IF;
        RESIGNAL;
    END;
    IF own_transaction THEN
        START TRANSACTION;
    END IF;
"""

_CLAIM_PROCEDURE = """
CREATE PROCEDURE rt_claim_within_limits(
    IN task_id VARCHAR(36), IN claimed_name VARCHAR(255), IN claimer VARCHAR(255),
    IN claim_started DATETIME(6), IN lease_micros BIGINT)
MODIFIES SQL DATA
BEGIN
    DECLARE own_transaction BOOLEAN DEFAULT @@autocommit = 1;
    DECLARE found_row BOOLEAN DEFAULT TRUE;
    DECLARE row_key, row_rate_key {key_type};
    DECLARE row_rate_limit VARCHAR(32);
    DECLARE row_waiting VARCHAR(16);
    DECLARE row_created DATETIME(6);
    DECLARE row_limit BIGINT;
    DECLARE taken BIGINT;
    DECLARE claim_now, bucket_allowed, bucket_reserved DATETIME(6);
    DECLARE period VARCHAR(32);
    DECLARE rate_micros BIGINT;
    DECLARE result VARCHAR(255) DEFAULT NULL;
{begin}    claim: BEGIN
        SELECT concurrency_key, concurrency_limit, rate_key, rate_limit, waiting_for, created_at
            INTO row_key, row_limit, row_rate_key, row_rate_limit, row_waiting, row_created
            FROM reliable_tasks_taskrecord WHERE id = task_id;
        IF NOT found_row OR (row_key IS NULL AND row_rate_key IS NULL) THEN
            LEAVE claim;
        END IF;
        IF row_key IS NOT NULL THEN
            INSERT INTO reliable_tasks_tasklimiter (`key`) VALUES (CONCAT('c:', row_key))
                ON DUPLICATE KEY UPDATE `key` = `key`;
        END IF;
        SET claim_now = UTC_TIMESTAMP(6);
        IF row_rate_key IS NOT NULL THEN
            INSERT INTO reliable_tasks_tasklimiter (`key`) VALUES (CONCAT('r:', row_rate_key))
                ON DUPLICATE KEY UPDATE `key` = `key`;
            SELECT allowed_at, reserved_until INTO bucket_allowed, bucket_reserved
                FROM reliable_tasks_tasklimiter WHERE `key` = CONCAT('r:', row_rate_key);
            SET claim_now = UTC_TIMESTAMP(6);
            IF bucket_allowed > claim_now OR (row_waiting <> 'rate'
                    AND bucket_reserved > claim_now) THEN
                LEAVE claim;
            END IF;
            SET period = SUBSTRING_INDEX(row_rate_limit, '/', -1);
            SET rate_micros = CEIL(
                COALESCE(NULLIF(LEFT(period, CHAR_LENGTH(period) - 1), '') + 0, 1)
                * CASE RIGHT(period, 1) WHEN 's' THEN 1 WHEN 'm' THEN 60 WHEN 'h' THEN 3600
                                        ELSE 86400 END
                * 1000000 / SUBSTRING_INDEX(row_rate_limit, '/', 1));
        END IF;
        IF row_key IS NOT NULL THEN
            SELECT (SELECT COUNT(*) FROM reliable_tasks_taskrecord other
                    WHERE other.concurrency_key = row_key AND other.state = 'STARTED')
                 + (SELECT COUNT(*) FROM reliable_tasks_taskrecord other
                    WHERE other.concurrency_key = row_key
                      AND other.state IN ('WAITING', 'PENDING', 'QUEUED')
                      AND other.waiting_for = 'concurrency'
                      AND (other.created_at < row_created
                           OR (other.created_at = row_created AND other.id < task_id)))
                INTO taken;
            IF taken >= row_limit THEN
                LEAVE claim;
            END IF;
        END IF;
        UPDATE reliable_tasks_taskrecord
            SET state = 'STARTED', attempts = attempts + 1, worker = claimer,
                started_at = claim_started,
                lease_expires_at = claim_now + INTERVAL lease_micros MICROSECOND,
                next_attempt_at = NULL, waiting_for = ''
            WHERE id = task_id AND task_name = claimed_name
                AND state IN ('PENDING', 'QUEUED', 'RETRY', 'WAITING')
                AND (expires_at IS NULL OR expires_at >= claim_now)
                AND concurrency_key <=> row_key AND rate_key <=> row_rate_key;
        IF ROW_COUNT() = 0 THEN
            LEAVE claim;
        END IF;
        IF row_rate_key IS NOT NULL THEN
            UPDATE reliable_tasks_tasklimiter
                SET allowed_at = claim_now + INTERVAL rate_micros MICROSECOND
                WHERE `key` = CONCAT('r:', row_rate_key);
        END IF;
        SET result = COALESCE(row_key, '');
    END claim;
    IF own_transaction THEN
        COMMIT;
    END IF;
    SELECT result;
END
""".replace("{begin}", _BEGIN)
_FREE_SLOTS_PROCEDURE = """
CREATE PROCEDURE rt_free_slots_for_waiters(IN limited_key VARCHAR(255))
MODIFIES SQL DATA
BEGIN
    DECLARE own_transaction BOOLEAN DEFAULT @@autocommit = 1;
    DECLARE the_key {key_type} DEFAULT limited_key;
    DECLARE found_row BOOLEAN DEFAULT TRUE;
    DECLARE head_limit BIGINT;
    DECLARE free BIGINT DEFAULT 0;
{begin}    INSERT INTO reliable_tasks_tasklimiter (`key`) VALUES (CONCAT('c:', the_key))
        ON DUPLICATE KEY UPDATE `key` = `key`;
    SELECT concurrency_limit INTO head_limit FROM reliable_tasks_taskrecord
        WHERE concurrency_key = the_key AND state = 'WAITING'
            AND waiting_for = 'concurrency'
        ORDER BY created_at, id LIMIT 1;
    IF found_row THEN
        SELECT COALESCE(head_limit, 1)
            - (SELECT COUNT(*) FROM reliable_tasks_taskrecord
               WHERE concurrency_key = the_key AND state = 'STARTED')
            - (SELECT COUNT(*) FROM reliable_tasks_taskrecord
               WHERE concurrency_key = the_key AND state IN ('PENDING', 'QUEUED')
                   AND waiting_for = 'concurrency')
            INTO free;
    END IF;
    IF own_transaction THEN
        COMMIT;
    END IF;
    SELECT GREATEST(free, 0);
END
""".replace("{begin}", _BEGIN)
#: The columns of limit keys, compared byte for byte as on the other databases (the table's
#: default collation ignores case and trailing spaces): model, column, its type and nullity.
_KEY_COLUMNS = (("taskrecord", "concurrency_key", "varchar(255)", "NULL"),
                ("taskrecord", "rate_key", "varchar(255)", "NULL"),
                ("tasklimiter", "key", "varchar(257)", "NOT NULL"))
_DROP_PROCEDURES = ("DROP PROCEDURE IF EXISTS rt_claim_within_limits",
                    "DROP PROCEDURE IF EXISTS rt_free_slots_for_waiters")
_WAITERS_INDEX = "rt_task_waiters"
_WAITERS_COLUMNS = {"before": ("concurrency_key", "created_at"),
                    "after": ("concurrency_key", "state", "waiting_for", "created_at")}


class ClaimProcedure(migrations.operations.base.Operation):
    """On MySQL and MariaDB only: the procedures ``rt_claim_within_limits`` and
    ``rt_free_slots_for_waiters``, the columns of the index ``rt_task_waiters``, and the
    binary collation of the limit keys."""

    reversible = True

    def state_forwards(self, app_label, state):
        pass  # no model changes

    def _index(self, schema_editor, model, columns):
        quote = schema_editor.quote_name
        listed = ", ".join(quote(column) for column in columns)
        schema_editor.execute(
            f"ALTER TABLE {quote(model._meta.db_table)} DROP INDEX {quote(_WAITERS_INDEX)}, "
            f"ADD INDEX {quote(_WAITERS_INDEX)} ({listed})")

    def _key_columns(self, schema_editor, apps, collation):
        """Give the key columns ``collation`` (None: the table's default)."""
        quote = schema_editor.quote_name
        collated = f" CHARACTER SET utf8mb4 COLLATE {collation}" if collation else ""
        for model_name, column, column_type, nullity in _KEY_COLUMNS:
            table = quote(apps.get_model("reliable_tasks", model_name)._meta.db_table)
            schema_editor.execute(
                f"ALTER TABLE {table} MODIFY {quote(column)} {column_type}{collated} {nullity}")

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        connection = schema_editor.connection
        if connection.vendor == "mysql":
            collation = "utf8mb4_nopad_bin" if connection.mysql_is_mariadb else "utf8mb4_0900_bin"
            key_type = f"VARCHAR(255) CHARACTER SET utf8mb4 COLLATE {collation}"
            self._key_columns(schema_editor, to_state.apps, collation)
            model = to_state.apps.get_model(app_label, "taskrecord")
            self._index(schema_editor, model, _WAITERS_COLUMNS["after"])
            for drop in _DROP_PROCEDURES:
                schema_editor.execute(drop, params=None)
            for procedure in (_CLAIM_PROCEDURE, _FREE_SLOTS_PROCEDURE):
                schema_editor.execute(procedure.replace("{key_type}", key_type), params=None)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "mysql":
            for drop in _DROP_PROCEDURES:
                schema_editor.execute(drop, params=None)
            model = to_state.apps.get_model(app_label, "taskrecord")
            self._index(schema_editor, model, _WAITERS_COLUMNS["before"])
            self._key_columns(schema_editor, to_state.apps, None)

    def describe(self):
        return "On MySQL/MariaDB, the procedures of the limited claim and the wake-up, an index, and binary limit keys"


class Migration(migrations.Migration):

    dependencies = [
        ("reliable_tasks", "0010_limits"),
    ]

    operations = [
        ClaimProcedure(),
    ]

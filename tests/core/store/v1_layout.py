"""The job index's layout as shipped before schema versioning: Tether wrote
exactly these statements on start, one at a time. Never derive them from the
code: they are what databases in the field hold."""

V1_TABLE = {
    "sqlite": """CREATE TABLE IF NOT EXISTS tether_jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    backend TEXT NOT NULL,
    state TEXT NOT NULL,
    params TEXT NOT NULL,
    metadata TEXT NOT NULL,
    timeout REAL NOT NULL,
    fingerprint TEXT NOT NULL,
    deadline INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    external TEXT,
    result TEXT,
    error TEXT,
    finished_at INTEGER,
    next_check_at INTEGER
)""",
    "postgres": """CREATE TABLE IF NOT EXISTS tether_jobs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    backend TEXT NOT NULL,
    state TEXT NOT NULL,
    params TEXT NOT NULL,
    metadata TEXT NOT NULL,
    timeout DOUBLE PRECISION NOT NULL,
    fingerprint TEXT NOT NULL,
    deadline BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    external TEXT,
    result TEXT,
    error TEXT,
    finished_at BIGINT,
    next_check_at BIGINT
)""",
}
V1_INDEXES = (
    "CREATE INDEX IF NOT EXISTS tether_jobs_state ON tether_jobs (state, seq)",
    "CREATE INDEX IF NOT EXISTS tether_jobs_backend ON tether_jobs (backend, seq)",
    "CREATE INDEX IF NOT EXISTS tether_jobs_deadline ON tether_jobs (deadline)"
    " WHERE finished_at IS NULL",
    "CREATE INDEX IF NOT EXISTS tether_jobs_check ON tether_jobs (next_check_at)"
    " WHERE next_check_at IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS tether_jobs_finished ON tether_jobs (finished_at)"
    " WHERE finished_at IS NOT NULL",
)
V1_ROWS = (
    "INSERT INTO tether_jobs (id, backend, state, params, metadata, timeout, fingerprint,"
    " deadline, created_at, updated_at, external, result, error, finished_at, next_check_at)"
    " VALUES ('done', 'http_webhook', 'succeeded', '{\"url\":\"http://x/y\"}', '{\"team\":\"a\"}',"
    " 60.5, 'fp-1', 1700000060000, 1700000000000, 1700000005000, '{\"run\":7}',"
    " '{\"rows\":[1,2]}', NULL, 1700000005000, NULL)",
    "INSERT INTO tether_jobs (id, backend, state, params, metadata, timeout, fingerprint,"
    " deadline, created_at, updated_at, external, result, error, finished_at, next_check_at)"
    " VALUES ('broke', 'databricks', 'failed', '{}', '{}', 30.0, 'fp-2', 1700000090000,"
    ' 1700000001000, 1700000002000, NULL, NULL, \'{"message":"boom","type":"E1"}\','
    " 1700000002000, NULL)",
    "INSERT INTO tether_jobs (id, backend, state, params, metadata, timeout, fingerprint,"
    " deadline, created_at, updated_at, external, result, error, finished_at, next_check_at)"
    " VALUES ('busy', 'databricks', 'running', '{\"job\":1}', '{}', 3600.0, 'fp-3',"
    " 1700003601000, 1700000001000, 1700000003000, '{\"run_id\":9}', NULL, NULL, NULL,"
    " 1700000063000)",
)

-- The teachers' verdicts (`audit confirm`): runs, per-candidate scores, and
-- per-generation agreement with the fast path. Documented in schemas/README.md.

CREATE TABLE confirm_runs (
    id               BIGINT PRIMARY KEY,
    method           VARCHAR NOT NULL,
    model_hash       VARCHAR NOT NULL,
    model_path       VARCHAR NOT NULL,
    encoder_id       VARCHAR NOT NULL,
    settings         JSON NOT NULL,
    settings_hash    VARCHAR NOT NULL,
    noise_floor      DOUBLE,
    signal_to_noise  DOUBLE,
    started_at       TIMESTAMP NOT NULL,
    finished_at      TIMESTAMP,
    n_generations    BIGINT NOT NULL DEFAULT 0,
    seconds_per_generation DOUBLE,
    status           VARCHAR NOT NULL
);

CREATE TABLE teacher_scores (
    run_id          BIGINT NOT NULL,
    generation_id   BIGINT NOT NULL,
    training_id     BIGINT NOT NULL,
    influence       DOUBLE NOT NULL,
    raw_influence   DOUBLE NOT NULL,
    teacher_rank    INTEGER NOT NULL,
    fast_rank       INTEGER,
    is_control      BOOLEAN NOT NULL,
    PRIMARY KEY (run_id, generation_id, training_id)
);

CREATE TABLE confirmations (
    generation_id   BIGINT NOT NULL,
    run_id          BIGINT NOT NULL,
    method          VARCHAR NOT NULL,
    encoder_id      VARCHAR NOT NULL,
    k               INTEGER NOT NULL,
    map_at_k        DOUBLE NOT NULL,
    top1_agree      BOOLEAN NOT NULL,
    spearman        DOUBLE NOT NULL,
    control_margin  DOUBLE NOT NULL,
    confirmed       BOOLEAN NOT NULL,
    seconds         DOUBLE NOT NULL,
    confirmed_at    TIMESTAMP NOT NULL,
    PRIMARY KEY (generation_id, run_id)
);

-- Each fast attribution beside the latest teacher verdict on its generation.
CREATE VIEW attribution_checks AS
WITH latest AS (
    SELECT * FROM confirmations
    QUALIFY row_number() OVER (PARTITION BY generation_id, encoder_id ORDER BY confirmed_at DESC, run_id DESC) = 1
)
SELECT
    a.generation_id, a.method, a.encoder_id, a.rank, a.training_id, a.score, a.share, a.scan_id,
    l.run_id AS confirm_run_id,
    l.method AS teacher_method,
    l.confirmed AS generation_confirmed,
    s.teacher_rank,
    coalesce(l.confirmed AND s.teacher_rank <= l.k, false) AS confirmed
FROM attributions a
LEFT JOIN latest l ON l.generation_id = a.generation_id AND l.encoder_id = a.encoder_id
LEFT JOIN teacher_scores s ON s.run_id = l.run_id AND s.generation_id = a.generation_id AND s.training_id = a.training_id;

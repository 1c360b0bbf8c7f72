-- Ground-truth checks stored (issue #29): every run of `audit eval counterfactual` (leave-K-out), `audit eval planted`
-- and `audit eval lds`, with each method's headline metric and its standard error, so `audit confirm --method auto`
-- can pick the teacher that did best on this workspace's own checks, the report can show how each teacher fared, and
-- a distilled bundle must beat the untuned baseline before it becomes the workspace's encoder (auditor/checks.py).
-- Documented in schemas/README.md.

CREATE TABLE eval_runs (
    id            BIGINT PRIMARY KEY,
    kind          VARCHAR NOT NULL,  -- counterfactual | planted | lds | bundle
    model_hash    VARCHAR NOT NULL,
    encoder_id    VARCHAR NOT NULL,
    settings      VARCHAR NOT NULL,  -- JSON
    n             INTEGER NOT NULL,  -- generations (counterfactual, lds) or generated images (planted) averaged over
    seconds       DOUBLE,
    finished_at   TIMESTAMP NOT NULL
);

CREATE TABLE eval_results (
    run_id        BIGINT NOT NULL,
    method        VARCHAR NOT NULL,  -- fast | abu | dtrak | untuned | untuned_image | random | similar
    encoder_id    VARCHAR,           -- the bundle whose ranking `fast` (or `untuned`) is; NULL for teachers and controls
    metric        VARCHAR NOT NULL,  -- relative_loss_increase | map | lds
    value         DOUBLE,
    stderr        DOUBLE,
    label         VARCHAR            -- the method as the check's own table names it
);

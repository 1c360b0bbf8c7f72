-- Every file a scan found holding an attributed generation, with the prompt read from that file: two files with the
-- same bytes are one generation but keep both prompts. And each scan's count of files of a type it cannot read.
-- Documented in schemas/README.md.

CREATE TABLE generation_files (
    generation_id  BIGINT NOT NULL,
    path           VARCHAR NOT NULL,
    prompt         VARCHAR,
    prompt_source  VARCHAR NOT NULL,
    first_scan_id  BIGINT NOT NULL,
    last_scan_id   BIGINT NOT NULL,
    recorded_at    TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (generation_id, path)
);

-- The file each generation was first seen in, with the prompt stored on the generation.
INSERT INTO generation_files (generation_id, path, prompt, prompt_source, first_scan_id, last_scan_id, recorded_at)
SELECT id, path, prompt, prompt_source, first_scan_id, first_scan_id, created_at FROM generations;

ALTER TABLE scans ADD COLUMN n_unsupported BIGINT DEFAULT 0;

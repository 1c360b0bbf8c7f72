-- What each distillation query's ranking was made from: the query image's content when the teacher ranked it, and
-- when a folder query was superseded by a new file under its path. Documented in schemas/README.md.

ALTER TABLE distill_queries ADD COLUMN sha256 VARCHAR;
ALTER TABLE distill_queries ADD COLUMN replaced_at TIMESTAMP;

-- Verdicts with a stated error rate (issue #29): per confirmed generation, a rank test of the fast top-k against the
-- random controls and the fast/teacher agreement judged against the teacher's agreement with itself, giving
-- `confirmed`, `disputed` or `inconclusive` (auditor/verdict.py, docs/methods.md §1). The numbers behind each verdict
-- are stored beside it. Confirmations made before this migration keep a NULL verdict. Documented in schemas/README.md.

ALTER TABLE confirmations ADD COLUMN verdict VARCHAR;
ALTER TABLE confirmations ADD COLUMN verdict_reason VARCHAR;
ALTER TABLE confirmations ADD COLUMN deciding_setting VARCHAR;
ALTER TABLE confirmations ADD COLUMN p_value DOUBLE;
ALTER TABLE confirmations ADD COLUMN auc DOUBLE;
ALTER TABLE confirmations ADD COLUMN chance DOUBLE;
ALTER TABLE confirmations ADD COLUMN self_agreement DOUBLE;
ALTER TABLE confirmations ADD COLUMN relative_agreement DOUBLE;
ALTER TABLE confirmations ADD COLUMN noise_floor DOUBLE;

-- The view gains the generation's verdict; `confirmed` still means the generation is confirmed and the teacher ranks
-- this image within its top-k, now with `confirmed` decided by the verdict.
DROP VIEW attribution_checks;
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
    coalesce(l.confirmed AND s.teacher_rank <= l.k, false) AS confirmed,
    l.verdict,
    s.influence AS teacher_influence
FROM attributions a
LEFT JOIN latest l ON l.generation_id = a.generation_id AND l.encoder_id = a.encoder_id
LEFT JOIN teacher_scores s ON s.run_id = l.run_id AND s.generation_id = a.generation_id AND s.training_id = a.training_id;

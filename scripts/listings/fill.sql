-- 300,000 notifications for scripts/listings/measure_sqlite.py, into a SQLite file migrated by
-- `herald migrate`: sqlite3 FILE < fill.sql. Without ANALYZE, as Herald runs none.
-- 300,000 notifications: ids ascend with time as UUIDv7s do. 60% addressed to one of 20,000
-- customers, 40% to an inline contact (one of 50,000 addresses); 3% scheduled (three bulk sends
-- of 3,000, each due at one moment), 20 queued, the rest sent/delivered/failed/skipped.
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300000)
INSERT INTO notifications (id, customer_id, recipient_key, contacts, category, channels, content,
  status, status_reason, scheduled_at, final_channel, attempts, created_at, updated_at, sent_at)
SELECT
  printf('%08x-0000-7000-8000-%012x', i, i),
  CASE WHEN i % 5 < 3 THEN 'customer-' || (i % 20000) END,
  CASE WHEN i % 5 < 3 THEN 'customer-' || (i % 20000) ELSE 'user' || (i % 50000) || '@example.com' END,
  '{}', CASE WHEN i % 10 = 0 THEN 'marketing' ELSE 'transactional' END, '["email"]',
  '{"subject":"Hello there","text":"Body"}',
  CASE WHEN i % 100 < 3 THEN 'scheduled' WHEN i % 15000 = 7 THEN 'queued'
       WHEN i % 100 < 10 THEN 'delivered' WHEN i % 100 < 12 THEN 'failed'
       WHEN i % 100 < 13 THEN 'skipped' ELSE 'sent' END,
  NULL,
  CASE WHEN i % 100 < 3 THEN strftime('%Y-%m-%d %H:%M:%S+00:00', '2026-12-08', '+' || (i % 3) || ' hours') END,
  CASE WHEN i % 100 >= 3 AND i % 15000 <> 7 THEN 'email' END, 1,
  strftime('%Y-%m-%d %H:%M:%S+00:00', '2026-11-01', '+' || (i / 10) || ' seconds'),
  strftime('%Y-%m-%d %H:%M:%S+00:00', '2026-11-01', '+' || (i / 10) || ' seconds'),
  CASE WHEN i % 100 >= 10 THEN strftime('%Y-%m-%d %H:%M:%S+00:00', '2026-11-01', '+' || (i / 10) || ' seconds') END
FROM n;


-- 300,000 notifications for scripts/listings/measure_pg.sh, into a database migrated by
-- `herald migrate`: psql -d DB -f fill_pg.sql.
-- As fill.sql (which says how they are spread), for PostgreSQL.
INSERT INTO notifications (id, customer_id, recipient_key, contacts, category, channels, content,
  status, status_reason, scheduled_at, final_channel, attempts, created_at, updated_at, sent_at)
SELECT
  (lpad(to_hex(i), 8, '0') || '-0000-7000-8000-' || lpad(to_hex(i), 12, '0'))::uuid,
  CASE WHEN i % 5 < 3 THEN 'customer-' || (i % 20000) END,
  CASE WHEN i % 5 < 3 THEN 'customer-' || (i % 20000) ELSE 'user' || (i % 50000) || '@example.com' END,
  '{}', CASE WHEN i % 10 = 0 THEN 'marketing' ELSE 'transactional' END, '["email"]',
  '{"subject":"Hello there","text":"Body"}',
  CASE WHEN i % 100 < 3 THEN 'scheduled' WHEN i % 15000 = 7 THEN 'queued'
       WHEN i % 100 < 10 THEN 'delivered' WHEN i % 100 < 12 THEN 'failed'
       WHEN i % 100 < 13 THEN 'skipped' ELSE 'sent' END,
  NULL,
  CASE WHEN i % 100 < 3 THEN timestamptz '2026-12-08' + (i % 3) * interval '1 hour' END,
  CASE WHEN i % 100 >= 3 AND i % 15000 <> 7 THEN 'email' END, 1,
  timestamptz '2026-11-01' + (i / 10) * interval '1 second',
  timestamptz '2026-11-01' + (i / 10) * interval '1 second',
  CASE WHEN i % 100 >= 10 THEN timestamptz '2026-11-01' + (i / 10) * interval '1 second' END
FROM generate_series(1, 300000) AS i;
VACUUM ANALYZE notifications;

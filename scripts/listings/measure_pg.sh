#!/bin/bash
# Times the dashboard's and the API's listings on a PostgreSQL database filled by fill_pg.sql
# (best of 5, generic plans as a prepared statement may switch to), with the plan's main nodes.
# Usage: measure_pg.sh DBNAME old|new  (old: the feed's single OR condition; new: its two halves)
set -e
db=$1
feed=$([ "$2" = old ] && echo feed_or || echo feed_union)
cols="id, created_at, status, final_channel, channels, category, customer_id, recipient_key, status_reason, substr(coalesce(content ->> 'subject', content ->> 'text'), 1, 80) AS subject"
prepare="SET plan_cache_mode = force_generic_plan;
PREPARE feed_or(text) AS SELECT $cols FROM notifications WHERE customer_id = \$1 OR (customer_id IS NULL AND recipient_key = \$1) ORDER BY id DESC LIMIT 100;
PREPARE feed_union(text) AS SELECT * FROM (SELECT $cols FROM notifications WHERE customer_id = \$1 ORDER BY id DESC LIMIT 100) AS by_customer UNION ALL (SELECT * FROM (SELECT $cols FROM notifications WHERE customer_id IS NULL AND recipient_key = \$1 ORDER BY id DESC LIMIT 100) AS by_contact) ORDER BY id DESC LIMIT 100;
PREPARE sched AS SELECT id, scheduled_at, category, customer_id, recipient_key, channels FROM notifications WHERE status = 'scheduled' ORDER BY scheduled_at ASC, id ASC LIMIT 51;
PREPARE queued AS SELECT * FROM notifications WHERE status = 'queued' ORDER BY id DESC LIMIT 50;
PREPARE scheduled AS SELECT * FROM notifications WHERE status = 'scheduled' ORDER BY id DESC LIMIT 51;"
run() { (echo "$prepare"; cat) | psql -h /var/run/postgresql -U root -d "$db" -tA 2>&1; }
for q in "$feed('customer-19999')" "$feed('user4@example.com')" "$feed('customer-2')" sched queued scheduled; do
  t=$(for r in 1 2 3 4 5; do echo "EXPLAIN (ANALYZE, COSTS OFF) EXECUTE $q;"; done | run |
    sed -n 's/Execution Time: //p' | sort -n | head -1)
  p=$(echo "EXPLAIN (COSTS OFF) EXECUTE $q;" | run | grep -E "Scan|Sort|Append" |
    sed 's/^ *//; s/->  //' | head -4 | tr '\n' '|')
  printf "%-34s %12s   %s\n" "$q" "$t" "$p"
done

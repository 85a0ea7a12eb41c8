#!/bin/bash
# WAL bytes per notification on PostgreSQL for the workload of writecost.sh (50,000 notifications,
# inserted 1,000 to a transaction, claimed 250 to one, sent 500 to one), against a schema
# migrated by the given herald binary. Usage: writecost_pg.sh HERALD DBNAME
set -e
herald=$1; name=$2
psql -q -h /var/run/postgresql -U root -d postgres -c "DROP DATABASE IF EXISTS $name" -c "CREATE DATABASE $name"
HERALD_DATABASE__URL="postgres://root@localhost/$name?host=/var/run/postgresql" "$herald" migrate > /dev/null 2>&1
{
echo "SELECT pg_current_wal_lsn() AS start \gset"
for b in $(seq 0 49); do
  echo "INSERT INTO notifications (id, customer_id, recipient_key, contacts, category, channels, content, status, created_at, updated_at)
  SELECT (lpad(to_hex(i), 8, '0') || '-0000-7000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, CASE WHEN i % 5 < 3 THEN 'customer-' || (i % 5000) END,
    CASE WHEN i % 5 < 3 THEN 'customer-' || (i % 5000) ELSE 'user' || (i % 5000) || '@example.com' END,
    '{}', 'transactional', '[\"email\"]', '{\"subject\":\"Hello\"}', 'queued', now(), now() FROM generate_series($((b*1000+1)), $((b*1000+1000))) AS i;"
  for c in 0 1 2 3; do lo=$((b*1000+c*250+1)); hi=$((lo+249));
    echo "UPDATE notifications SET status='processing', updated_at=now() WHERE id BETWEEN (lpad(to_hex($lo), 8, '0') || '-0000-7000-8000-' || lpad(to_hex($lo), 12, '0'))::uuid AND (lpad(to_hex($hi), 8, '0') || '-0000-7000-8000-' || lpad(to_hex($hi), 12, '0'))::uuid;"
  done
  for c in 0 1; do lo=$((b*1000+c*500+1)); hi=$((lo+499));
    echo "UPDATE notifications SET status='sent', final_channel='email', sent_at=now(), updated_at=now() WHERE id BETWEEN (lpad(to_hex($lo), 8, '0') || '-0000-7000-8000-' || lpad(to_hex($lo), 12, '0'))::uuid AND (lpad(to_hex($hi), 8, '0') || '-0000-7000-8000-' || lpad(to_hex($hi), 12, '0'))::uuid;"
  done
done
echo "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), :'start') / 50000 AS wal_bytes_per_notification;"
} > /tmp/writecost-pg-$$.sql
psql -q -h /var/run/postgresql -U root -d $name -f /tmp/writecost-pg-$$.sql -tA
psql -q -h /var/run/postgresql -U root -d postgres -c "DROP DATABASE $name"
rm -f /tmp/writecost-pg-$$.sql

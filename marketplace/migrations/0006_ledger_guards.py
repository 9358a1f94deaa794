"""The ledger and finalized invoices, guarded by PostgreSQL itself (ARCHITECTURE invariant 4):

- ledger transactions and entries, usage records and invoices (with their lines) are never updated
  or deleted: corrections are reversing entries;
- a transaction's entries sum to zero, checked when the inserting transaction commits (a deferred
  constraint trigger), whatever code wrote them."""

from django.db import migrations

IMMUTABLE = [
    "marketplace_ledgertransaction",
    "marketplace_ledgerentry",
    "marketplace_usagerecord",
    "marketplace_invoice",
    "marketplace_invoiceline",
]

FORWARD = """
CREATE FUNCTION neocloud_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% rows are immutable: write a reversing entry instead', TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END $$;

CREATE FUNCTION neocloud_ledger_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    total numeric;
BEGIN
    SELECT sum(amount) INTO total FROM marketplace_ledgerentry WHERE transaction_id = NEW.transaction_id;
    IF total <> 0 THEN
        RAISE EXCEPTION 'ledger transaction % does not balance: its entries sum to %', NEW.transaction_id, total
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER ledger_balanced
    AFTER INSERT ON marketplace_ledgerentry
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION neocloud_ledger_balanced();
""" + "".join(
    f"CREATE TRIGGER {table}_immutable BEFORE UPDATE OR DELETE ON {table} "
    "FOR EACH ROW EXECUTE FUNCTION neocloud_refuse_change();\n"
    for table in IMMUTABLE
)

BACKWARD = (
    "".join(f"DROP TRIGGER IF EXISTS {table}_immutable ON {table};\n" for table in IMMUTABLE)
    + """
DROP TRIGGER IF EXISTS ledger_balanced ON marketplace_ledgerentry;
DROP FUNCTION IF EXISTS neocloud_ledger_balanced();
DROP FUNCTION IF EXISTS neocloud_refuse_change();
"""
)


class Migration(migrations.Migration):
    dependencies = [("marketplace", "0005_billing")]

    operations = [migrations.RunSQL(FORWARD, BACKWARD)]

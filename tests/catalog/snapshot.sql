-- Catalog snapshot of the manna_crypt extension: its whole SQL surface as
-- sorted text lines, one column `line`, so that two databases can be
-- compared with diff:
--
--   * a fresh CREATE EXTENSION against tests/catalog/expected.txt (a build
--     that changes the SQL surface by accident fails
--     tests/python/test_catalog_snapshot.py);
--   * a database upgraded with ALTER EXTENSION ... UPDATE against a fresh
--     install of the same version (the upgrade scripts must produce exactly
--     what a fresh install produces).
--
-- Run it with `scripts/catalog_snapshot.sh [psql args]`, with
-- `psql -X -At -f tests/catalog/snapshot.sql`, or from Python with
-- tests/python/catalog_snapshot.py (rows joined with newlines). It is a
-- single SELECT that changes nothing but transaction-local settings (see
-- below), and works on PostgreSQL 15 and later: it uses no catalog column
-- or function newer than 14 (pg_proc.prosqlbody, pg_get_function_sqlbody).
-- Tried on PostgreSQL 15, 16 and 18.
--
-- What is covered: everything the extension owns, i.e. every object with a
-- pg_depend row of deptype 'e' on the manna_crypt extension, plus what
-- belongs to those objects (columns, constraints, indexes, triggers, rules,
-- policies), plus the extension's schema and the pg_extension row itself.
-- A pg_dump --schema-only shows none of this (extension members are not
-- dumped), hence this query. Sections, in output order:
--
--   extension  schema, relocatable, requires, the configuration tables of
--              pg_dump (extconfig as names, with their extcondition).
--              extversion is left out on purpose: an upgraded database is
--              compared with a fresh install of the same version, and the
--              expected snapshot should not change with every version bump.
--   schema     owner and ACL of the extension's schema.
--   member     pg_describe_object() of every member: catches any kind of
--              object (casts, operators, aggregates...) even where no
--              section below describes its details. Event triggers get a
--              second line: event, tags, function, enabled state, owner.
--   proc/src   every member function and procedure: identity arguments,
--              result, all arguments with defaults, kind, language,
--              volatility, parallel safety, strictness, SECURITY DEFINER,
--              leakproof, cost, rows, proconfig, support function, owner,
--              ACL, probin and the body. pgrx functions have a one-line
--              prosrc (`<rust fn>_wrapper`); multi-line bodies (SQL,
--              plpgsql) follow as `src` lines, one per body line, in
--              order, named by the shorter regprocedure form.
--   type/con/enum  member types: kind, base type, NOT NULL, default,
--              collation, owner, ACL; domain constraints; enum labels.
--   rel/col/seq/view/con/index/trigger/rule/policy
--              member tables, views, sequences (and composite types):
--              relkind, persistence, row-level security flags, replica
--              identity, options, owner, ACL; columns; sequence parameters
--              (never its current value) and OWNED BY; view definitions;
--              constraints; indexes; triggers and their enabled state;
--              rules; policies.
--   comment    obj_description/col_description of every object above
--              (columns, constraints, the schema and the extension too).
--   initpriv   pg_init_privs rows (the privileges pg_dump treats as the
--              extension's own) of every object above.
--
-- What is left out, because it differs between two installs of the same
-- SQL surface: OIDs (only ever used to join, never printed), attnums
-- (columns are listed by name: an upgrade that adds a column puts it last,
-- a fresh install where the CREATE TABLE says; dropped columns do not
-- show), relfilenodes, statistics, row counts, sequence values, the
-- internal triggers of foreign keys (their names contain OIDs), the table
-- data, extversion, and the name of the role
-- that ran CREATE EXTENSION: wherever it appears (owners, ACL grantees and
-- grantors) it is printed as <owner>. ACLs are printed as the effective
-- privileges (a NULL ACL as acldefault()), in aclitem syntax, entries
-- sorted; PUBLIC is the empty grantee as in aclitem. Roles other than the
-- owner and PUBLIC are printed by name (manna_crypt_user, manna_crypt_admin);
-- the roles themselves are cluster-wide, not extension members, and not
-- described.
--
-- Text from pg_get_*def(), pg_get_expr(), format_type() and regclass
-- depends on session settings; the query pins them for its own transaction
-- (set_config(..., true)) before anything else is computed: search_path is
-- pg_catalog only, so every extension object is schema-qualified whatever
-- the caller's search_path, and the settings that change how constants are
-- printed (DateStyle, IntervalStyle, extra_float_digits, bytea_output,
-- TimeZone, quote_all_identifiers) get their default values. The
-- settings are taken in the single-row subquery `cfg`; the rest is a
-- LATERAL subquery that refers to it, so it is executed only after them.
-- They end with the transaction: at once from psql -At -f or in
-- autocommit mode; run inside an explicit transaction, they last until it
-- ends (tests/python/catalog_snapshot.py runs the query in a transaction
-- of its own).
-- Sorting is by section and then by name in the "C" collation, so the
-- order does not depend on the database's locale.
--
-- The text printed by the pg_get_* functions differs between PostgreSQL
-- major versions (16 prints view columns unqualified, 17 adds the
-- MAINTAIN privilege to tables' ACLs, 18 records row and array types as
-- extension members and NOT NULL as constraints): compare snapshots taken
-- on the same major version. tests/catalog/expected.txt is PostgreSQL 15's.

SELECT s.line
  FROM (SELECT pg_catalog.set_config('search_path', 'pg_catalog', true) AS search_path,
               pg_catalog.set_config('DateStyle', 'ISO, MDY', true) AS datestyle,
               pg_catalog.set_config('IntervalStyle', 'postgres', true) AS intervalstyle,
               pg_catalog.set_config('extra_float_digits', '1', true) AS extra_float_digits,
               pg_catalog.set_config('bytea_output', 'hex', true) AS bytea_output,
               pg_catalog.set_config('TimeZone', 'UTC', true) AS timezone,
               pg_catalog.set_config('quote_all_identifiers', 'off', true) AS quote_all_identifiers
        OFFSET 0) AS cfg
 CROSS JOIN LATERAL (
WITH
-- The extension. The reference to cfg makes everything below wait for the
-- settings.
ext AS (
    SELECT e.oid, e.extname, e.extowner, e.extnamespace, e.extrelocatable,
           e.extconfig, e.extcondition
      FROM pg_catalog.pg_extension e
     WHERE e.extname = 'manna_crypt' AND cfg.search_path IS NOT NULL
),
members AS (
    SELECT d.classid, d.objid, d.objsubid
      FROM pg_catalog.pg_depend d JOIN ext ON d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
                                          AND d.refobjid = ext.oid
     WHERE d.deptype = 'e'
),
-- Role names as printed: the extension's owner (whoever ran CREATE
-- EXTENSION) as <owner>, PUBLIC (oid 0) as the empty string.
roles AS (
    SELECT r.oid, CASE WHEN r.oid = ext.extowner THEN '<owner>' ELSE r.rolname::text END AS name
      FROM pg_catalog.pg_roles r CROSS JOIN ext
    UNION ALL
    SELECT 0::pg_catalog.oid, ''
),
procs AS (
    SELECT p.*, pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(p.proname)
                || '(' || pg_catalog.pg_get_function_identity_arguments(p.oid) || ')' AS sig,
           p.oid::pg_catalog.regprocedure::text AS rp  -- shorter, for the src lines
      FROM members m JOIN pg_catalog.pg_proc p ON p.oid = m.objid
      JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
     WHERE m.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
),
types AS (
    SELECT t.*, pg_catalog.format_type(t.oid, NULL) AS tname
      FROM members m JOIN pg_catalog.pg_type t ON t.oid = m.objid
     WHERE m.classid = 'pg_catalog.pg_type'::pg_catalog.regclass
),
-- Member relations (indexes are described with their tables), and the
-- relations behind member composite types.
rels AS (
    SELECT c.*, c.oid::pg_catalog.regclass::text AS rname
      FROM pg_catalog.pg_class c
     WHERE c.relkind NOT IN ('i', 'I')
       AND (c.oid IN (SELECT objid FROM members WHERE classid = 'pg_catalog.pg_class'::pg_catalog.regclass)
            OR c.oid IN (SELECT typrelid FROM types WHERE typtype = 'c'))
),
cons AS (
    SELECT co.oid, co.conname, co.conrelid, co.contypid,
           coalesce(r.rname, t.tname) AS owner_name,
           CASE WHEN r.oid IS NOT NULL THEN 60 ELSE 50 END AS sec
      FROM pg_catalog.pg_constraint co
      LEFT JOIN rels r ON r.oid = co.conrelid
      LEFT JOIN types t ON t.oid = co.contypid
     WHERE r.oid IS NOT NULL OR t.oid IS NOT NULL
),
idxs AS (
    SELECT i.indexrelid AS oid, i.indrelid, ic.relname
      FROM pg_catalog.pg_index i JOIN rels r ON r.oid = i.indrelid
      JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
),
trigs AS (
    SELECT tg.oid, tg.tgname, tg.tgrelid, tg.tgenabled
      FROM pg_catalog.pg_trigger tg JOIN rels r ON r.oid = tg.tgrelid
     WHERE NOT tg.tgisinternal
),
rules AS (
    SELECT rw.oid, rw.rulename, rw.ev_class, rw.ev_enabled
      FROM pg_catalog.pg_rewrite rw JOIN rels r ON r.oid = rw.ev_class
     WHERE rw.rulename <> '_RETURN'
),
pols AS (
    SELECT po.* FROM pg_catalog.pg_policy po JOIN rels r ON r.oid = po.polrelid
),
-- Every object the snapshot describes, for comments and initial privileges
-- (matched on class and object, any sub-id: columns are sub-objects).
objs AS (
    SELECT classid, objid FROM members
    UNION SELECT 'pg_catalog.pg_extension'::pg_catalog.regclass, oid FROM ext
    UNION SELECT 'pg_catalog.pg_namespace'::pg_catalog.regclass, extnamespace FROM ext
    UNION SELECT 'pg_catalog.pg_class'::pg_catalog.regclass, oid FROM rels
    UNION SELECT 'pg_catalog.pg_constraint'::pg_catalog.regclass, oid FROM cons
    UNION SELECT 'pg_catalog.pg_class'::pg_catalog.regclass, oid FROM idxs
    UNION SELECT 'pg_catalog.pg_trigger'::pg_catalog.regclass, oid FROM trigs
    UNION SELECT 'pg_catalog.pg_rewrite'::pg_catalog.regclass, oid FROM rules
    UNION SELECT 'pg_catalog.pg_policy'::pg_catalog.regclass, oid FROM pols
),
-- Every ACL printed, keyed by an internal reference (never printed):
-- effective privileges, NULL meaning the built-in default.
acl_in AS (
    SELECT 'proc ' || oid AS ref, coalesce(proacl, pg_catalog.acldefault('f', proowner)) AS acl FROM procs
    UNION ALL
    SELECT 'type ' || oid, coalesce(typacl, pg_catalog.acldefault('T', typowner)) FROM types
    UNION ALL
    SELECT 'rel ' || oid, coalesce(relacl, pg_catalog.acldefault((CASE WHEN relkind = 'S' THEN 's' ELSE 'r' END)::"char", relowner))
      FROM rels WHERE relkind <> 'c'  -- a composite type's privileges are its pg_type row's
    UNION ALL
    SELECT 'col ' || a.attrelid || ' ' || a.attnum, a.attacl  -- NULL: no column privileges
      FROM pg_catalog.pg_attribute a JOIN rels r ON r.oid = a.attrelid
     WHERE a.attnum > 0 AND NOT a.attisdropped
    UNION ALL
    SELECT 'nsp ' || n.oid, coalesce(n.nspacl, pg_catalog.acldefault('n', n.nspowner))
      FROM pg_catalog.pg_namespace n JOIN ext ON n.oid = ext.extnamespace
    UNION ALL
    SELECT 'init ' || ip.classoid || ' ' || ip.objoid || ' ' || ip.objsubid, ip.initprivs
      FROM pg_catalog.pg_init_privs ip JOIN objs o ON o.classid = ip.classoid AND o.objid = ip.objoid
),
-- Privilege letters in aclitem order (m = MAINTAIN, PostgreSQL 17+).
privs (priv, letter, ord) AS (
    VALUES ('INSERT', 'a', 1), ('SELECT', 'r', 2), ('UPDATE', 'w', 3), ('DELETE', 'd', 4),
           ('TRUNCATE', 'D', 5), ('REFERENCES', 'x', 6), ('TRIGGER', 't', 7),
           ('EXECUTE', 'X', 8), ('USAGE', 'U', 9), ('CREATE', 'C', 10),
           ('TEMPORARY', 'T', 11), ('CONNECT', 'c', 12), ('SET', 's', 13),
           ('ALTER SYSTEM', 'A', 14), ('MAINTAIN', 'm', 15)
),
acl_items AS (
    SELECT a.ref, coalesce(ge.name, '?') || '=' || x.letters || '/' || coalesce(gr.name, '?') AS item
      FROM (SELECT * FROM acl_in WHERE pg_catalog.cardinality(acl) > 0) a  -- aclexplode('{}') fails
     CROSS JOIN LATERAL (
        SELECT e.grantee, e.grantor,
               pg_catalog.string_agg(coalesce(p.letter, '[' || e.privilege_type || ']')
                                     || CASE WHEN e.is_grantable THEN '*' ELSE '' END,
                                     '' ORDER BY coalesce(p.ord, 99), e.privilege_type) AS letters
          FROM pg_catalog.aclexplode(a.acl) e LEFT JOIN privs p ON p.priv = e.privilege_type
         GROUP BY e.grantee, e.grantor) x
      LEFT JOIN roles ge ON ge.oid = x.grantee
      LEFT JOIN roles gr ON gr.oid = x.grantor
),
acls AS (
    SELECT a.ref, '{' || coalesce(pg_catalog.string_agg(i.item, ',' ORDER BY i.item COLLATE "C"), '') || '}' AS txt
      FROM acl_in a LEFT JOIN acl_items i ON i.ref = a.ref
     GROUP BY a.ref
),
lines (sec, key, sub, n, line) AS (
    ---------------------------------------------------------------- extension
    SELECT 10, '', 0, 0::float8,
           'extension ' || pg_catalog.quote_ident(ext.extname)
           || ' | schema ' || pg_catalog.quote_ident(n.nspname)
           || ' | relocatable ' || ext.extrelocatable::text
      FROM ext JOIN pg_catalog.pg_namespace n ON n.oid = ext.extnamespace
    UNION ALL
    -- Not a silent empty snapshot (scripts/catalog_snapshot.sh fails on it).
    SELECT 10, '', 0, 0, 'extension manna_crypt is not installed in this database'
     WHERE NOT EXISTS (SELECT FROM ext)
    UNION ALL
    SELECT 10, 'requires', 0, 0, 'extension requires ' || pg_catalog.quote_ident(re.extname)
      FROM ext JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_extension'::pg_catalog.regclass
                                          AND d.objid = ext.oid
                                          AND d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
      JOIN pg_catalog.pg_extension re ON re.oid = d.refobjid
    UNION ALL
    SELECT 10, 'config', 0, 0,
           'extension config ' || c.tbl::pg_catalog.regclass::text
           || ' | condition ' || coalesce(pg_catalog.quote_literal(c.cond), 'NULL')
      FROM ext CROSS JOIN LATERAL ROWS FROM (pg_catalog.unnest(ext.extconfig), pg_catalog.unnest(ext.extcondition)) AS c (tbl, cond)
    ------------------------------------------------------------------- schema
    UNION ALL
    SELECT 20, '', 0, 0,
           'schema ' || pg_catalog.quote_ident(n.nspname)
           || ' | owner ' || coalesce(ro.name, '?')
           || ' | acl ' || acl.txt
      FROM ext JOIN pg_catalog.pg_namespace n ON n.oid = ext.extnamespace
      LEFT JOIN roles ro ON ro.oid = n.nspowner
      JOIN acls acl ON acl.ref = 'nsp ' || n.oid
    ------------------------------------------------------------------ members
    UNION ALL
    SELECT 30, pg_catalog.pg_describe_object(m.classid, m.objid, m.objsubid), 0, 0,
           'member ' || pg_catalog.pg_describe_object(m.classid, m.objid, m.objsubid)
      FROM members m
    UNION ALL
    -- Event triggers, under their member line: what fires them and whether
    -- they are enabled (ALTER EVENT TRIGGER ... DISABLE changes nothing else).
    SELECT 30, pg_catalog.pg_describe_object(m.classid, m.objid, m.objsubid), 1, 0,
           'event trigger ' || pg_catalog.quote_ident(et.evtname)
           || ' | event ' || et.evtevent::text
           || ' | tags ' || coalesce(pg_catalog.array_to_string(et.evttags, ', '), '-')
           || ' | function ' || et.evtfoid::pg_catalog.regprocedure::text
           || ' | enabled ' || et.evtenabled::text
           || ' | owner ' || coalesce(ro.name, '?')
      FROM members m JOIN pg_catalog.pg_event_trigger et ON et.oid = m.objid
      LEFT JOIN roles ro ON ro.oid = et.evtowner
     WHERE m.classid = 'pg_catalog.pg_event_trigger'::pg_catalog.regclass
    -------------------------------------------------------------------- procs
    UNION ALL
    SELECT 40, p.sig, 0, 0,
           'proc ' || p.sig
           || ' | returns ' || coalesce(pg_catalog.pg_get_function_result(p.oid), '-')
           || ' | args ' || coalesce(NULLIF(pg_catalog.pg_get_function_arguments(p.oid), ''), '-')
           || ' | kind ' || p.prokind::text
           || ' | language ' || l.lanname
           || ' | volatility ' || p.provolatile::text
           || ' | parallel ' || p.proparallel::text
           || ' | strict ' || p.proisstrict::text
           || ' | security definer ' || p.prosecdef::text
           || ' | leakproof ' || p.proleakproof::text
           || ' | cost ' || p.procost::text
           || ' | rows ' || p.prorows::text
           || ' | config ' || coalesce(p.proconfig::text, '-')
           || ' | support ' || CASE WHEN p.prosupport::pg_catalog.oid = 0 THEN '-' ELSE p.prosupport::pg_catalog.oid::pg_catalog.regprocedure::text END
           || ' | owner ' || coalesce(ro.name, '?')
           || ' | acl ' || acl.txt
           || ' | bin ' || coalesce(p.probin, '-')
           || ' | src ' || CASE WHEN p.prosqlbody IS NOT NULL THEN '(sql body below)'
                                WHEN p.prosrc LIKE '%' || pg_catalog.chr(10) || '%' THEN '(below)'
                                ELSE p.prosrc END
      FROM procs p JOIN pg_catalog.pg_language l ON l.oid = p.prolang
      LEFT JOIN roles ro ON ro.oid = p.proowner
      JOIN acls acl ON acl.ref = 'proc ' || p.oid
    UNION ALL
    -- Multi-line bodies, line by line (in order; no line numbers, so that an
    -- inserted line shows as one line in a diff).
    SELECT 40, p.sig, 1, b.n,
           'src ' || p.rp || ' |' || CASE WHEN b.l = '' THEN '' ELSE ' ' || b.l END
      FROM procs p
     CROSS JOIN LATERAL pg_catalog.regexp_split_to_table(
            CASE WHEN p.prosqlbody IS NOT NULL THEN pg_catalog.pg_get_function_sqlbody(p.oid) ELSE p.prosrc END,
            pg_catalog.chr(10)) WITH ORDINALITY AS b (l, n)
     WHERE p.prosqlbody IS NOT NULL OR p.prosrc LIKE '%' || pg_catalog.chr(10) || '%'
    -------------------------------------------------------------------- types
    UNION ALL
    SELECT 50, t.tname, 0, 0,
           'type ' || t.tname
           || ' | typtype ' || t.typtype::text
           || ' | base ' || CASE WHEN t.typbasetype = 0 THEN '-' ELSE pg_catalog.format_type(t.typbasetype, t.typtypmod) END
           || ' | not null ' || t.typnotnull::text
           || ' | default ' || coalesce(pg_catalog.pg_get_expr(t.typdefaultbin, 0), t.typdefault, '-')
           || ' | collation ' || CASE WHEN t.typcollation = coalesce((SELECT bt.typcollation FROM pg_catalog.pg_type bt
                                                                         WHERE bt.oid = t.typbasetype), 0) THEN '-'
                                      ELSE (SELECT pg_catalog.quote_ident(cn.nspname) || '.' || pg_catalog.quote_ident(co.collname)
                                              FROM pg_catalog.pg_collation co
                                              JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace
                                             WHERE co.oid = t.typcollation) END
           || ' | owner ' || coalesce(ro.name, '?')
           || ' | acl ' || acl.txt
      FROM types t LEFT JOIN roles ro ON ro.oid = t.typowner
      JOIN acls acl ON acl.ref = 'type ' || t.oid
    UNION ALL
    SELECT 50, t.tname, 2, e.enumsortorder::float8, 'enum ' || t.tname || ' | ' || pg_catalog.quote_literal(e.enumlabel)
      FROM types t JOIN pg_catalog.pg_enum e ON e.enumtypid = t.oid
    UNION ALL
    -- Constraints, of domains (section 50) and of tables (section 60).
    SELECT c.sec, c.owner_name, CASE WHEN c.sec = 50 THEN 1 ELSE 5 END, 0,
           'con ' || c.owner_name || ' | ' || pg_catalog.quote_ident(c.conname)
           || ' | ' || pg_catalog.pg_get_constraintdef(c.oid)
      FROM cons c
    ---------------------------------------------------------------- relations
    UNION ALL
    SELECT 60, r.rname, 0, 0,
           'rel ' || r.rname
           || ' | relkind ' || r.relkind::text
           || ' | persistence ' || r.relpersistence::text
           || ' | row security ' || r.relrowsecurity::text
           || ' | force row security ' || r.relforcerowsecurity::text
           || ' | replica identity ' || r.relreplident::text
           || ' | options ' || coalesce(r.reloptions::text, '-')
           || ' | inherits ' || coalesce((SELECT pg_catalog.string_agg(i.inhparent::pg_catalog.regclass::text, ', ' ORDER BY i.inhseqno)
                                           FROM pg_catalog.pg_inherits i WHERE i.inhrelid = r.oid), '-')
           || ' | tablespace ' || coalesce((SELECT pg_catalog.quote_ident(ts.spcname) FROM pg_catalog.pg_tablespace ts
                                             WHERE ts.oid = r.reltablespace), '-')
           || ' | owner ' || coalesce(ro.name, '?')
           || ' | acl ' || coalesce(acl.txt, '-')
      FROM rels r LEFT JOIN roles ro ON ro.oid = r.relowner
      LEFT JOIN acls acl ON acl.ref = 'rel ' || r.oid
    UNION ALL
    -- Columns by name (not attnum: see above).
    SELECT 60, r.rname, 1, 0,
           'col ' || r.rname || ' | ' || pg_catalog.quote_ident(a.attname)
           || ' | ' || pg_catalog.format_type(a.atttypid, a.atttypmod)
           || ' | not null ' || a.attnotnull::text
           || ' | default ' || coalesce(pg_catalog.pg_get_expr(ad.adbin, ad.adrelid), '-')
           || ' | identity ' || CASE a.attidentity WHEN '' THEN '-' ELSE a.attidentity::text END
           || ' | generated ' || CASE a.attgenerated WHEN '' THEN '-' ELSE a.attgenerated::text END
           || ' | collation ' || CASE WHEN a.attcollation = t.typcollation THEN '-'
                                      ELSE coalesce((SELECT pg_catalog.quote_ident(cn.nspname) || '.' || pg_catalog.quote_ident(co.collname)
                                                       FROM pg_catalog.pg_collation co
                                                       JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace
                                                      WHERE co.oid = a.attcollation), '-') END
           || ' | acl ' || coalesce(acl.txt, '-')
      FROM rels r JOIN pg_catalog.pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
      JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
      LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
      LEFT JOIN acls acl ON acl.ref = 'col ' || a.attrelid || ' ' || a.attnum
     WHERE r.relkind <> 'S'
    UNION ALL
    -- Sequence parameters (not the sequence's state) and OWNED BY.
    SELECT 60, r.rname, 2, 0,
           'seq ' || r.rname
           || ' | type ' || pg_catalog.format_type(sq.seqtypid, NULL)
           || ' | start ' || sq.seqstart::text
           || ' | increment ' || sq.seqincrement::text
           || ' | min ' || sq.seqmin::text
           || ' | max ' || sq.seqmax::text
           || ' | cache ' || sq.seqcache::text
           || ' | cycle ' || sq.seqcycle::text
           || ' | owned by ' || coalesce((SELECT pg_catalog.string_agg(
                                                    d.refobjid::pg_catalog.regclass::text || '.' || pg_catalog.quote_ident(a.attname)
                                                    || CASE d.deptype WHEN 'i' THEN ' (identity)' ELSE '' END,
                                                    ', ' ORDER BY d.refobjid::pg_catalog.regclass::text COLLATE "C", a.attname COLLATE "C")
                                            FROM pg_catalog.pg_depend d
                                            JOIN pg_catalog.pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                                           WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objid = r.oid
                                             AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
                                             AND d.refobjsubid > 0 AND d.deptype IN ('a', 'i')), '-')
      FROM rels r JOIN pg_catalog.pg_sequence sq ON sq.seqrelid = r.oid
    UNION ALL
    -- View definitions, line by line.
    SELECT 60, r.rname, 3, v.n,
           'view ' || r.rname || ' |' || CASE WHEN v.l = '' THEN '' ELSE ' ' || v.l END
      FROM rels r
     CROSS JOIN LATERAL pg_catalog.regexp_split_to_table(pg_catalog.pg_get_viewdef(r.oid, true), pg_catalog.chr(10))
           WITH ORDINALITY AS v (l, n)
     WHERE r.relkind IN ('v', 'm')
    UNION ALL
    SELECT 60, r.rname, 6, 0,
           'index ' || r.rname || ' | ' || pg_catalog.quote_ident(i.relname) || ' | ' || pg_catalog.pg_get_indexdef(i.oid)
      FROM idxs i JOIN rels r ON r.oid = i.indrelid
    UNION ALL
    SELECT 60, r.rname, 7, 0,
           'trigger ' || r.rname || ' | ' || pg_catalog.quote_ident(tg.tgname)
           || ' | enabled ' || tg.tgenabled::text || ' | ' || pg_catalog.pg_get_triggerdef(tg.oid)
      FROM trigs tg JOIN rels r ON r.oid = tg.tgrelid
    UNION ALL
    SELECT 60, r.rname, 8, 0,
           'rule ' || r.rname || ' | ' || pg_catalog.quote_ident(ru.rulename) || ' | enabled ' || ru.ev_enabled::text
      FROM rules ru JOIN rels r ON r.oid = ru.ev_class
    UNION ALL
    -- Rule definitions, line by line.
    SELECT 60, r.rname, 8, d.n,
           'rule ' || r.rname || ' | ' || pg_catalog.quote_ident(ru.rulename) || ' |' || CASE WHEN d.l = '' THEN '' ELSE ' ' || d.l END
      FROM rules ru JOIN rels r ON r.oid = ru.ev_class
     CROSS JOIN LATERAL pg_catalog.regexp_split_to_table(pg_catalog.pg_get_ruledef(ru.oid, true), pg_catalog.chr(10))
           WITH ORDINALITY AS d (l, n)
    UNION ALL
    SELECT 60, r.rname, 9, 0,
           'policy ' || r.rname || ' | ' || pg_catalog.quote_ident(po.polname)
           || ' | permissive ' || po.polpermissive::text
           || ' | cmd ' || po.polcmd::text
           || ' | roles ' || coalesce((SELECT pg_catalog.string_agg(pr.name, ', ' ORDER BY pr.name COLLATE "C")
                                         FROM (SELECT CASE WHEN ro.name = '' THEN 'PUBLIC' ELSE coalesce(ro.name, '?') END AS name
                                                 FROM pg_catalog.unnest(po.polroles) u (oid) LEFT JOIN roles ro ON ro.oid = u.oid) pr), '-')
           || ' | using ' || coalesce(pg_catalog.pg_get_expr(po.polqual, po.polrelid), '-')
           || ' | with check ' || coalesce(pg_catalog.pg_get_expr(po.polwithcheck, po.polrelid), '-')
      FROM pols po JOIN rels r ON r.oid = po.polrelid
    ----------------------------------------------------------------- comments
    UNION ALL
    SELECT 70, pg_catalog.pg_describe_object(d.classoid, d.objoid, d.objsubid), 0, 0,
           'comment ' || pg_catalog.pg_describe_object(d.classoid, d.objoid, d.objsubid)
           || ' | ' || pg_catalog.replace(pg_catalog.replace(d.description, pg_catalog.chr(92), pg_catalog.chr(92) || pg_catalog.chr(92)), pg_catalog.chr(10), pg_catalog.chr(92) || 'n')
      FROM pg_catalog.pg_description d JOIN objs o ON o.classid = d.classoid AND o.objid = d.objoid
    ------------------------------------------------------ initial privileges
    UNION ALL
    SELECT 80, pg_catalog.pg_describe_object(ip.classoid, ip.objoid, ip.objsubid), 0, 0,
           'initpriv ' || pg_catalog.pg_describe_object(ip.classoid, ip.objoid, ip.objsubid)
           || ' | ' || ip.privtype::text || ' | ' || acl.txt
      FROM pg_catalog.pg_init_privs ip JOIN objs o ON o.classid = ip.classoid AND o.objid = ip.objoid
      JOIN acls acl ON acl.ref = 'init ' || ip.classoid || ' ' || ip.objoid || ' ' || ip.objsubid
)
SELECT sec, key, sub, n, line FROM lines
OFFSET 0
) AS s
ORDER BY s.sec, s.key COLLATE "C", s.sub, s.n, s.line COLLATE "C";

#!/usr/bin/env python3
"""manna_crypt root key command for AWS KMS.

Decrypts a KMS data key (the CiphertextBlob that `GenerateDataKey` with
KeySpec AES_256 returned) with KMS `Decrypt` and prints its 32-byte
plaintext as 64 hex characters: the contract of
`manna_crypt.root_key_command` (README, "Root key from AWS KMS"). Only the
encrypted blob is stored on the server; the plaintext root key exists in
this process and in PostgreSQL's memory, never on disk.

    manna_crypt.root_key_command =
        '/usr/bin/python3 /etc/postgresql/aws_kms_root_key.py /etc/postgresql/manna_root.blob'

    aws_kms_root_key.py BLOB_FILE [--key-id ARN_OR_ALIAS] [--context KEY=VALUE ...]
                        [--region REGION] [--endpoint-url URL]
                        [--connect-timeout S] [--read-timeout S] [--attempts N]
                        [--count-file FILE]

BLOB_FILE holds the CiphertextBlob, raw (as `base64 -d` writes it) or in
base64. `--key-id` makes KMS refuse a blob of another key; `--context`
must repeat the encryption context the data key was generated with.
Credentials, region and endpoint come from boto3's usual chain (instance
role, environment, ~/.aws of the server's OS user) unless given here.
`--count-file` (or MC_KMS_COUNT_FILE) appends one line per run, before
KMS is called: the tests and benchmarks count invocations with it.

Exit status 0 and the key on standard output, or exit status 1 and one
line on standard error (manna_crypt puts that line in the server log).
The key is never printed anywhere else; no traceback is printed.
"""

import argparse
import base64
import binascii
import os
import sys
import time


B64_CHARS = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n"
)


class Failure(Exception):
    """A failure reported as one line on standard error."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("blob_file")
    p.add_argument("--key-id")
    p.add_argument("--context", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--region")
    p.add_argument("--endpoint-url")
    # Short by default: the whole run must end well within
    # manna_crypt.root_key_command_timeout (default 30 s).
    p.add_argument("--connect-timeout", type=float, default=3.0)
    p.add_argument("--read-timeout", type=float, default=5.0)
    p.add_argument("--attempts", type=int, default=2)
    p.add_argument("--count-file", default=os.environ.get("MC_KMS_COUNT_FILE"))
    return p.parse_args(argv)


def read_blob(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise Failure(f"cannot read the blob file {path}: {e.strerror}") from None
    text = data.strip()
    # A KMS ciphertext blob starts with a version byte (0x01), which is not
    # a base64 character: base64 text is told apart from raw bytes.
    if text and all(b in B64_CHARS for b in text):
        try:
            data = base64.b64decode(text, validate=False)
        except binascii.Error:
            raise Failure(f"the blob file {path} is neither raw nor base64") from None
    if not data:
        raise Failure(f"the blob file {path} is empty")
    return data


def parse_context(pairs):
    context = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise Failure(f"--context expects KEY=VALUE, got {pair!r}")
        context[key] = value
    return context


def count_run(path):
    if path:
        with open(path, "a") as f:
            f.write(f"{time.time():.3f} {os.getpid()}\n")


def decrypt(args, blob):
    try:
        import boto3
        import botocore.config
        import botocore.exceptions
    except ImportError:
        raise Failure(f"boto3 is not installed for {sys.executable}") from None
    config = botocore.config.Config(
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        retries={"max_attempts": max(1, args.attempts), "mode": "standard"},
    )
    request = {"CiphertextBlob": blob}
    if args.key_id:
        request["KeyId"] = args.key_id
    context = parse_context(args.context)
    if context:
        request["EncryptionContext"] = context
    try:
        kms = boto3.client(
            "kms", region_name=args.region, endpoint_url=args.endpoint_url, config=config
        )
        plaintext = kms.decrypt(**request)["Plaintext"]
    except botocore.exceptions.ClientError as e:
        err = e.response.get("Error", {})
        raise Failure(
            f"KMS Decrypt refused: {err.get('Code', 'error')}: {err.get('Message', '')}"
        ) from None
    except botocore.exceptions.BotoCoreError as e:
        # Connection refused, timeouts, no credentials, no region, ...
        raise Failure(f"KMS Decrypt failed: {type(e).__name__}: {e}") from None
    if len(plaintext) != 32:
        raise Failure(
            f"KMS returned {len(plaintext)} bytes, not 32: the blob is not an AES_256 data key"
        )
    return plaintext


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        blob = read_blob(args.blob_file)
        count_run(args.count_file)
        key = decrypt(args, blob)
    except Failure as e:
        print(f"aws_kms_root_key: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except Exception as e:  # never a traceback: one line, no key material
        print(f"aws_kms_root_key: unexpected {type(e).__name__}", file=sys.stderr)
        return 1
    sys.stdout.write(key.hex() + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The reference executor: `dlw executor run`.

It claims files from the executor API, downloads each from a Hugging Face-compatible file
endpoint ({endpoint}/{repo_id}/resolve/{revision}/{path}), streams it through a temporary file
next to its destination <storage>/<tenant>/<repo_id>/<revision>/<path>, verifies sha256 (and
the size), moves it into place with os.replace, and only then reports it complete. While a
download runs it heartbeats every lease/3 seconds; a 409 LEASE_LOST (the task was cancelled, or
the lease expired) aborts it and discards the partial file.

SIGTERM or SIGINT: stop claiming, abort the downloads in flight, give their files back to the
queue at once (release: no attempt is used up) and exit 0. A killed executor gives nothing
back: its leases expire and the files are claimed again.

Exit codes: 0 after a clean stop, 2 for a configuration error, 3 when the API refuses the
token (401/403: expired, wrong secret, or not an executor).

Modules: `settings` (flags and DLW_EXECUTOR_* variables; independent of the server's
app.config), `client` (the executor API and its retry policy), `download` (path safety,
which byte path a file takes), `transfer` (large files: parallel ranges, resume, in threads),
`curl_lane` (small files: libcurl, many at once from one thread), `layout` (where files go and
how they are published), `batching` (reports sent together), `progress` (the terminal status
line), `runner` (the claim loop, one task per file, the `dlw executor run` command).
Behaviour in full: docs/reference-executor.md.
"""

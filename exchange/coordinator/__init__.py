"""The operator's coordinator service: Litestar API, registry, studies, audit and ledger views."""

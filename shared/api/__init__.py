"""What a call's answer is made of, below any transport: errors and status codes (:mod:`.errors`),
the current caller and scopes (:mod:`.callers`), page tokens (:mod:`.pagetoken`), JSON documents
(:mod:`.documents`), timestamps (:mod:`.timestamps`), answer budgets (:mod:`.answers`) and the API
key format (:mod:`.apikeys`). No gRPC here."""

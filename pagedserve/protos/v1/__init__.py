"""pagedserve.v1 stubs: generation (public API) and coordinator (internal API)."""

"""SPIFFE identity over mTLS: IDs, X.509-SVIDs, bundles, TLS contexts, sources, XFCC."""

__all__: list[str] = []

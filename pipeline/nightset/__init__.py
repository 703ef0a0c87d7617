"""Building a night query set as the thesis built SF-XL test night (issue 7).

collect (geotagged photos of an area, Flickr API) -> filter (outdoor, night) ->
dedupe (near-identical shots) -> relabel (a local web tool, append-only log) ->
verify (a database image within 25 m; VG file names; counts at each step).
Each stage reads and writes CSV tables (atomically) so it can be a Snakemake rule.
"""

"""The app's figures: pure functions, data in, a `Plot` (a plotly figure and a note) out; no Streamlit.

- layout:  titles, subtitles and margins that fit a half-width column
- firing:  the Plot type, the cell budget (MAX_CELLS) and the per-token firing views
- quality: density per layer, |h| histograms, mass kept, the density sweep, dense vs sparse outputs
- routing: recall and precision by policy, firing frequency, co-firing, router entropy, expert load
- speed:   forward timing, kernel and decode benchmarks
- corpus:  a corpus profile's views
- claims:  the demo LM's perplexity against density
"""

"""The explorer's single page: inline CSS and JavaScript over the JSON API, nothing from the network."""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>glassmetric explorer</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0; color: #222; background: #f6f6f4; }
header { background: #253746; color: #fff; padding: 12px 22px; }
header h1 { margin: 0; font-size: 19px; } header p { margin: 3px 0 0; font-size: 12.5px; opacity: .85; }
main { display: grid; grid-template-columns: 330px 1fr; gap: 14px; padding: 14px 22px; }
section { background: #fff; border-radius: 6px; padding: 10px 14px; box-shadow: 0 1px 2px #0002; }
h2 { font-size: 15px; margin: 4px 0 8px; }
#picker { display: flex; flex-wrap: wrap; gap: 4px; max-height: 420px; overflow-y: auto; }
#picker button { all: unset; cursor: pointer; } #picker img { width: 56px; height: 56px; object-fit: cover; display: block; border: 2px solid #ddd; }
#picker button:hover img { border-color: #2a7f9e; }
#query img { width: 150px; height: 150px; object-fit: cover; border: 3px solid #253746; }
#error { color: #b2182b; font-weight: bold; min-height: 1.2em; font-size: 13px; }
#results { display: flex; flex-wrap: wrap; gap: 8px; }
#ranking { font-size: 13px; margin: 0 0 8px; display: flex; gap: 14px; align-items: center; flex-wrap: wrap; }
button.result { all: unset; cursor: pointer; width: 112px; font-size: 11px; line-height: 1.3; vertical-align: top; }
button.result .name { display: -webkit-box; -webkit-line-clamp: 2; -webkit-box-orient: vertical; overflow: hidden;
  overflow-wrap: anywhere; max-width: 106px; }
button.result .score { font-weight: bold; } .move { font-weight: bold; margin-left: 4px; }
.move.up { color: #1a9850; } .move.down { color: #d73027; } .move.same { color: #888; }
.same-image { display: inline-block; background: #fee08b; color: #222; padding: 0 4px; border-radius: 3px; margin: 2px 0; }
button.result img { width: 106px; height: 106px; object-fit: cover; border: 3px solid #999; display: block; }
button.result.hit img { border-color: #1a9850; } button.result.miss img { border-color: #d73027; }
button.result.selected img { outline: 3px solid #2a7f9e; }
.hit .mark { color: #1a9850; font-weight: bold; } .miss .mark { color: #d73027; font-weight: bold; }
#explanation img { max-width: 100%; display: block; margin: 6px 0; }
#explanation pre { background: #f3f3f3; padding: 6px 10px; font-size: 13px; white-space: pre-wrap; }
.muted { color: #666; font-size: 12px; }
</style></head>
<body>
<header><h1>glassmetric explorer</h1><p id="info">loading...</p></header>
<main>
<div>
<section><h2>Upload a query image</h2>
<form id="upload-form"><input type="file" id="upload" name="image" accept="image/*"> <button type="submit" id="search-upload">Search</button></form>
<p id="error" role="alert"></p></section>
<section><h2>... or pick one from the gallery</h2><div id="picker"></div>
<button id="more" hidden>more</button></section>
</div>
<div>
<section><h2>Query</h2><div id="query" class="muted">no query yet</div></section>
<section><h2>Results</h2>
<form id="ranking"><span>Order by</span>
<label><input type="radio" name="rerank" value="global" checked> global similarity (cosine)</label>
<label id="structural-choice"><input type="radio" name="rerank" value="structural"> structural re-ranking of the top
<select id="rerank-k"><option>10</option><option>20</option><option selected>50</option><option>100</option></select> (cos + SS)</label></form>
<p class="muted" id="legend">green: same class as the query, red: another class (gallery queries of a labelled gallery). Click a result to see why it came back.</p><div id="results"></div></section>
<section id="explanation-section"><h2>Explanation</h2><div id="explanation" class="muted">click a result</div></section>
</div>
</main>
<script>
const $ = id => document.getElementById(id);
const K = 10;
let offset = 0, current = null;
const fmt = v => (v === null || v === undefined) ? '' : v.toFixed(3);
const NAMES = {global: 'cos', structural: 'SS', multiscale: 'cos + SS',
               introspective: 'introspective distance', uncertainty: 'uncertainty'};
const EXPLAINS = {embedding: 'whole-image similarity', local: 'part-by-part matching',
                  uncertainty: 'uncertainty'};
function esc(s) { const d = document.createElement('div'); d.textContent = s ?? ''; return d.innerHTML; }
async function api(url, options) {
  const r = await fetch(url, options);
  const body = await r.json().catch(() => ({detail: r.statusText}));
  if (!r.ok) throw new Error(`${r.status}: ${body.detail}`);
  return body;
}
function ranking() {
  const mode = document.querySelector('input[name=rerank]:checked').value;
  return mode === 'structural' ? {rerank: mode, rerank_k: $('rerank-k').value} : {rerank: mode};
}
function searchUrl(query) {
  return '/api/search?' + new URLSearchParams({query, k: K, ...ranking()});
}
async function loadInfo() {
  const i = await api('/api/info');
  const what = i.fields.map(f => EXPLAINS[f] || f).concat(i.heads.includes('grouping') ? ['attention groups'] : []);
  const model = i.checkpoint.split(/[\\\\/]/).pop();
  $('info').textContent = `${i.gallery_size} gallery images` + (i.labelled ? ` in ${i.classes} classes` : '') +
    ` from ${i.gallery} \\u00b7 model ${model} \\u00b7 explains results by ${what.join(', ')}`;
  $('info').title = `checkpoint ${i.checkpoint}`;
  if (!i.rankings.includes('structural')) $('structural-choice').hidden = true;
}
async function loadGallery() {
  const g = await api(`/api/gallery?offset=${offset}&limit=60`);
  for (const item of g.items) {
    const b = document.createElement('button');
    b.title = item.class === null ? item.name : `${item.name} (${item.class})`; b.dataset.id = item.id;
    b.innerHTML = `<img src="/api/images/${item.id}" alt="${esc(item.name)}" loading="lazy">`;
    b.addEventListener('click', () => show(api(searchUrl(item.id))));
    $('picker').appendChild(b);
  }
  offset += g.items.length;
  $('more').hidden = offset >= g.total;
}
function moveMark(r, structural) {
  if (!structural) return '';
  if (r.move === null) return '<span class="move up" title="not in the global top results">new</span>';
  const title = `global rank #${r.global_rank}`;
  if (r.move > 0) return `<span class="move up" title="${title}">&#8593;${r.move}</span>`;
  if (r.move < 0) return `<span class="move down" title="${title}">&#8595;${-r.move}</span>`;
  return `<span class="move same" title="${title}">=</span>`;
}
async function show(pending) {
  $('error').textContent = '';
  let res;
  try { res = await pending; } catch (e) { $('error').textContent = e.message; return; }
  current = res.query;
  const structural = res.ranking.method === 'structural';
  const u = res.uncertainty === null ? '' : `<br>uncertainty ${fmt(res.uncertainty)}`;
  $('query').innerHTML = `<img src="/api/images/${res.query}" alt="query"><br><span class="muted">` +
    `${res.query.startsWith('u') ? 'your upload' : 'gallery image ' + res.query}` +
    `${res.query_class ? ', class ' + esc(res.query_class) : ''}${u}</span>`;
  $('results').innerHTML = '';
  $('results').dataset.orderedBy = res.ranking.ordered_by;
  $('explanation').innerHTML = 'click a result';
  $('legend').textContent = (structural
    ? `Ordered by cos + SS after re-ranking the global top ${res.ranking.k}; arrows: rank change against the global order. `
    : 'Ordered by the global cosine. ') +
    'Green: same class as the query, red: another class. Click a result to see why it came back.';
  for (const r of res.results) {
    const b = document.createElement('button');
    const cls = r.correct === null ? '' : (r.correct ? 'hit' : 'miss');
    b.className = `result ${cls}`;
    b.dataset.id = r.id;
    const mark = r.correct === null ? '' : (r.correct ? ' &#10003;' : ' &#10007;');
    const key = structural ? 'multiscale' : 'global';
    // the ordering score in bold; below it the others (global order: not cos + SS, which does not order it)
    const others = Object.entries(r.scores).filter(([k]) => k !== key && (structural || k !== 'multiscale'))
      .map(([k, v]) => `${NAMES[k] || k} ${fmt(v)}`).join('<br>');
    const label = r.class === null ? r.name : r.class;
    b.title = r.class === null ? r.name : `${r.class}: ${r.name}`;
    b.innerHTML = `<img src="/api/images/${r.id}" alt="result ${r.rank}"><span class="mark">#${r.rank}${mark}</span>` +
      moveMark(r, structural) + (r.same_image ? '<br><span class="same-image">same image as the query</span>' : '') +
      `<span class="name">${esc(label)}</span><span class="score" data-value="${r.score}">${NAMES[key]} ${fmt(r.score)}</span>` +
      `<br><span class="muted">${others}</span>`;
    b.addEventListener('click', () => explain(res.query, r.id, b));
    $('results').appendChild(b);
  }
}
async function explain(query, result, button) {
  document.querySelectorAll('button.result.selected').forEach(b => b.classList.remove('selected'));
  button.classList.add('selected');
  $('explanation').textContent = 'explaining...';
  $('explanation-section').scrollIntoView({block: 'start'});
  try {
    const e = await api(`/api/explain?query=${query}&result=${result}`);
    // the figures state the scores; the words are their alternative text, shown when there is no figure
    const words = esc(e.lines.join('\\n'));
    const figs = Object.entries(e.figures).map(([k, url]) =>
      `<img class="figure" data-kind="${k}" src="${url}" alt="${k} explanation: ${words}">`).join('');
    $('explanation').innerHTML = figs || `<pre>${words}</pre>`;
    // scrolled again as each figure arrives: until then the page may be too short to scroll to it
    const reveal = () => $('explanation-section').scrollIntoView({block: 'start'});
    reveal();
    $('explanation').querySelectorAll('img').forEach(i => i.addEventListener('load', reveal, {once: true}));
  } catch (err) { $('explanation').textContent = err.message; }
}
$('ranking').addEventListener('change', () => { if (current) show(api(searchUrl(current))); });
$('upload-form').addEventListener('submit', ev => {
  ev.preventDefault();
  const file = $('upload').files[0];
  if (!file) { $('error').textContent = 'choose an image file first'; return; }
  const form = new FormData();
  form.append('image', file);
  form.append('k', K);
  for (const [k, v] of Object.entries(ranking())) form.append(k, v);
  show(api('/api/search', {method: 'POST', body: form}));
});
$('more').addEventListener('click', loadGallery);
loadInfo().catch(e => $('info').textContent = e.message);
loadGallery().catch(e => $('error').textContent = e.message);
</script></body></html>
"""

// The timeline of DIOE's trace report: draws one call's partition runs per member lane as SVG.
(function(){
const D = JSON.parse(document.getElementById('dioe-data').textContent);
const COLORS = D.colors;  // tracereport.backend_colors(): each backend file's colour, shared with the legend and the bench chart
const color = b => COLORS[b] || '#6c7a89';
const NS = 'http://www.w3.org/2000/svg';
function el(tag, attrs, text){const e=document.createElementNS(NS,tag);for(const k in attrs)e.setAttribute(k,attrs[k]);if(text!==undefined)e.textContent=text;return e;}
function draw(k){
  const call = D.calls.find(c => c.call === k) || D.calls[0];
  const svg = document.getElementById('timeline');
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const L = 250, W = Math.max(900, document.body.clientWidth - 80), R = 20, H0 = 34, HEAD = 22, ROW = 26;
  const scale = (W - L - R) / Math.max(call.ms, 1e-6);
  let y = H0; const laneY = {};
  for (const m of D.members){
    const g = el('g', {'class':'member-group'});
    g.appendChild(el('rect', {x:0, y:y, width:W, height:HEAD, fill:'#eef2f7'}));
    g.appendChild(el('text', {x:8, y:y+15, 'class':'member', 'font-weight':'600', 'font-size':'13'}, m.label));
    svg.appendChild(g); y += HEAD;
    const lanes = m.lanes.length ? m.lanes : [{tid:-1, name:'(no partition ran here)'}];
    for (const ln of lanes){
      laneY[m.pid + ':' + ln.tid] = y;
      svg.appendChild(el('text', {x:22, y:y+17, 'class':'lane', 'font-size':'12', fill:'#4a5466'}, ln.name));
      svg.appendChild(el('line', {x1:L, x2:W-R, y1:y+ROW, y2:y+ROW, stroke:'#e6e9ef'}));
      y += ROW;
    }
  }
  const step = niceStep(call.ms / 8);
  for (let t = 0; t <= call.ms + 1e-9; t += step){
    const x = L + t * scale;
    svg.appendChild(el('line', {x1:x, x2:x, y1:H0-6, y2:y, stroke:'#dfe3ea', 'stroke-dasharray':'2,3'}));
    svg.appendChild(el('text', {x:x, y:H0-10, 'font-size':'11', 'text-anchor':'middle', fill:'#6b7485'}, fmt(t) + ' ms'));
  }
  const boxes = [];
  for (const s of call.slices){
    const ly = laneY[s.pid + ':' + s.tid]; if (ly === undefined){boxes.push(null); continue;}
    const x = L + s.t * scale, w = Math.max(s.d * scale, 1.5);
    const r = el('rect', {x:x, y:ly+4, width:w, height:ROW-8, rx:3, fill:color(s.backend), 'class':'slice' + (s.critical ? ' critical' : ''),
                          stroke: s.critical ? D.critical : 'none', 'stroke-width': s.critical ? 2.5 : 0});
    r.appendChild(el('title', {}, s.tip + (s.critical ? '\non the critical path' : '') + (s.fallback ? '\nFELL BACK to the reference backend' : '')));
    svg.appendChild(r);
    // a bar too narrow for its name gets it just beside, in ink, where the lane has room
    if (w > 46) svg.appendChild(el('text', {x:x+5, y:ly+17, 'font-size':'11', fill:'#fff', 'pointer-events':'none'}, s.label));
    else if (s.d > 0 && x + w + 60 < W - R) svg.appendChild(el('text', {x:x+w+4, y:ly+17, 'font-size':'11', fill:'#39414f', 'pointer-events':'none'}, s.label));
    else if (s.d > 0) svg.appendChild(el('text', {x:x-4, y:ly+17, 'font-size':'11', fill:'#39414f', 'text-anchor':'end', 'pointer-events':'none'}, s.label));
    boxes.push({x:x, w:w, y:ly+ROW/2});
  }
  for (const [a, b] of call.flows){
    const A = boxes[a], B = boxes[b]; if (!A || !B) continue;
    const x1 = A.x + A.w, x2 = B.x, mid = (x1 + x2) / 2;
    svg.appendChild(el('path', {d:`M${x1},${A.y} C${mid},${A.y} ${mid},${B.y} ${x2},${B.y}`, fill:'none', stroke:'#39414f', 'stroke-width':1.2, 'marker-end':'url(#arrow)', opacity:0.7}));
  }
  const defs = el('defs', {}); const mk = el('marker', {id:'arrow', viewBox:'0 0 10 10', refX:9, refY:5, markerWidth:6, markerHeight:6, orient:'auto'});
  mk.appendChild(el('path', {d:'M0,0 L10,5 L0,10 z', fill:'#39414f'})); defs.appendChild(mk); svg.appendChild(defs);
  svg.setAttribute('width', W); svg.setAttribute('height', y + 10);
  document.getElementById('call-ms').textContent = fmt(call.ms) + ' ms';
}
function niceStep(x){const p = Math.pow(10, Math.floor(Math.log10(Math.max(x, 1e-6)))); for (const m of [1,2,5,10]) if (m*p >= x) return m*p; return 10*p;}
function fmt(t){return t >= 10 ? t.toFixed(1) : t.toFixed(t >= 1 ? 2 : 3);}
const sel = document.getElementById('call');
if (!D.calls.length){document.getElementById('timeline-section').style.display='none'; document.body.dataset.rendered='1'; return;}
const names = {}; for (const [k, v] of Object.entries(D.picks)) (names[v] = names[v] || []).push(k);
for (const c of D.calls){const o = document.createElement('option'); o.value = c.call; o.textContent = `call #${c.call} (${fmt(c.ms)} ms)` + (names[c.call] ? ' — ' + names[c.call].join(', ') : ''); sel.appendChild(o);}
sel.value = D.picks.median; sel.addEventListener('change', () => draw(Number(sel.value)));
window.addEventListener('resize', () => draw(Number(sel.value)));
draw(D.picks.median);
document.body.dataset.rendered = '1';
})();

KS.ready.then(function(data){
  function parse(id){return data[id];}
  document.querySelectorAll('[data-figure]').forEach(function(div){
    var fig = parse(div.getAttribute('data-figure'));
    Plotly.newPlot(div, fig.data, fig.layout, {responsive:true, displaylogo:false});
  });
  // Numbers as kernelscope/reports/numbers.py writes them, one rule per unit.
  var SUP = {'-': '\u207b', '0': '\u2070', '1': '\u00b9', '2': '\u00b2', '3': '\u00b3', '4': '\u2074',
             '5': '\u2075', '6': '\u2076', '7': '\u2077', '8': '\u2078', '9': '\u2079'};
  var UNSUP = {};
  Object.keys(SUP).forEach(function(k){UNSUP[SUP[k]] = k;});
  function group(s){
    var p = s.split('.'); p[0] = p[0].replace(/\B(?=(\d{3})+(?!\d))/g, ','); return p.join('.');
  }
  function digits(a){
    if(a === 0){return '0.00';}
    if(a >= 0.01){return group(a.toFixed(2));}
    if(a < 1e-6){return '<0.000001';}
    return a.toFixed(1 - Math.floor(Math.log10(a)));
  }
  function missing(x){return x === null || x === undefined || (typeof x === 'number' && isNaN(x));}
  function share(x){
    if(missing(x)){return '';}
    var v = 100 * x;
    return (v < 0 ? '-' : '') + digits(Math.abs(v)) + '%';
  }
  function magnitude(x){
    if(missing(x)){return '';}
    if(x === 0){return '0';}
    var a = Math.abs(x);
    if(a >= 1e-3 && a < 1e5){return group(x.toFixed(Math.max(0, 3 - Math.floor(Math.log10(a)))));}
    var e = x.toExponential(3).split('e');
    return e[0] + '\u00d710' + String(parseInt(e[1], 10)).replace(/[-0-9]/g, function(c){return SUP[c];});
  }
  window.KS_FORMAT = {share: share, magnitude: magnitude, count: function(n){return group(String(n));}};
  // Every data table sorts by a click on a header: by the number a cell starts with where every
  // non-empty cell of the column starts with one, else by its text in natural order.
  function sortValue(text){
    var m = /^\[?<?([+-]?[0-9][0-9,]*(?:\.[0-9]+)?)(?:\u00d710([\u207b\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+))?/
      .exec(text.trim());
    if(!m){return null;}
    var x = parseFloat(m[1].replace(/,/g, ''));
    if(m[2]){x *= Math.pow(10, parseInt(m[2].replace(/./g, function(c){return UNSUP[c];}), 10));}
    return x;
  }
  function sortable(t){
    var body = t.tBodies[0];
    Array.prototype.forEach.call(t.tHead.rows[0].cells, function(th, i){
      th.classList.add('sortable');
      th.addEventListener('click', function(){
        var dir = (t.getAttribute('data-sort-col') === String(i) && t.getAttribute('data-sort-dir') === 'asc') ? -1 : 1;
        var rows = Array.prototype.slice.call(body.rows);
        var keys = rows.map(function(r){return r.cells[i] ? r.cells[i].textContent.trim() : '';});
        var nums = keys.map(sortValue);
        var numeric = keys.every(function(k, j){return k === '' || nums[j] !== null;});
        var order = rows.map(function(r, j){return j;}).sort(function(a, b){
          if(keys[a] === '' || keys[b] === ''){return (keys[a] === '') - (keys[b] === '') || a - b;}
          var c = numeric ? nums[a] - nums[b] : keys[a].localeCompare(keys[b], undefined, {numeric: true});
          return c * dir || a - b;
        });
        order.forEach(function(j){body.appendChild(rows[j]);});
        t.setAttribute('data-sort-col', String(i));
        t.setAttribute('data-sort-dir', dir > 0 ? 'asc' : 'desc');
      });
    });
  }
  document.querySelectorAll('table').forEach(function(t){
    if(t.id !== 'layer-table' && !t.classList.contains('facts') && t.tHead && t.tHead.rows.length
       && t.tBodies.length){sortable(t);}
  });
  var table = document.getElementById('layer-table');
  if(!table){return;}
  var longCols = parse('layer-cols'), body = table.tBodies[0];
  var longRows = parse('layer-rows').map(function(r){
    return r.map(function(v, i){return (longCols[i].values && v !== null) ? longCols[i].values[v] : v;});});
  var cols = longCols, rows = longRows, wide = false;
  var sortCol = -1, sortDir = 1, filter = '', colFilters = [];
  function cell(v, c){
    if(v === null || v === undefined){return '';}
    if(c.pct){return share(v);}
    if(typeof v === 'number'){return c.float ? magnitude(v) : group(String(v));}
    return String(v);
  }
  function matches(r){
    var shown = r.map(function(v, i){return cell(v, cols[i]).toLowerCase();});
    var terms = filter.split(/\s+/).filter(Boolean);
    if(!terms.every(function(t){return shown.some(function(s){return s.indexOf(t) >= 0;});})){return false;}
    return colFilters.every(function(f, i){
      if(!f){return true;}
      var m = /^([<>]=?)\s*(-?[0-9.]+)(%?)$/.exec(f);
      if(m && typeof r[i] === 'number'){
        var x = cols[i].pct ? 100 * r[i] : r[i], y = parseFloat(m[2]);
        return m[1] === '<' ? x < y : m[1] === '<=' ? x <= y : m[1] === '>' ? x > y : x >= y;
      }
      return shown[i].indexOf(f) >= 0;
    });
  }
  function compare(x, y){
    if(x === y){return 0;} if(x === null || x === undefined){return 1;} if(y === null || y === undefined){return -1;}
    if(typeof x === 'number' && typeof y === 'number'){return (x < y ? -1 : 1) * sortDir;}
    return String(x).localeCompare(String(y), undefined, {numeric: true}) * sortDir;
  }
  function shownRows(){
    var shown = rows.filter(matches);
    if(sortCol >= 0){shown.sort(function(a, b){return compare(a[sortCol], b[sortCol]);});}
    return shown;
  }
  function header(){
    var head = table.tHead;
    head.textContent = '';
    var names = head.insertRow(), filters = head.insertRow();
    filters.className = 'filters';
    colFilters = cols.map(function(){return '';});
    cols.forEach(function(c, i){
      var th = document.createElement('th');
      th.className = 'sortable'; th.textContent = c.title || c.name;
      th.addEventListener('click', function(){sortDir = (sortCol === i) ? -sortDir : 1; sortCol = i; render();
        table.setAttribute('data-sorted', c.name + (sortDir > 0 ? ' asc' : ' desc'));});
      names.appendChild(th);
      var td = document.createElement('td'), box = document.createElement('input');
      box.type = 'search'; box.placeholder = c.pct || c.numeric ? '>1.5' : 'filter';
      box.setAttribute('data-column', c.name);
      box.addEventListener('input', function(e){colFilters[i] = e.target.value.trim().toLowerCase(); render();});
      td.appendChild(box); filters.appendChild(td);
    });
  }
  function render(){
    var shown = shownRows();
    body.textContent = '';
    shown.forEach(function(r){
      var tr = document.createElement('tr');
      r.forEach(function(v, i){var td = document.createElement('td'); td.textContent = cell(v, cols[i]);
        if(typeof v === 'number'){td.className = 'num';} tr.appendChild(td);});
      body.appendChild(tr);});
    document.getElementById('layer-count').textContent = shown.length + ' of ' + rows.length + ' rows';
  }
  function widen(){
    var at = {}; longCols.forEach(function(c, i){at[c.name] = i;});
    var keys = ['run', 'layer', 'block', 'module_type', 'transform'], series = [], index = {}, out = [];
    longRows.forEach(function(r){
      var config = r[at.config];
      if(series.indexOf(config) < 0){series.push(config);}
      var key = keys.map(function(k){return r[at[k]];}).join('\u0000');
      if(!(key in index)){index[key] = out.length; out.push(keys.map(function(k){return r[at[k]];}));}
      out[index[key]][keys.length + series.indexOf(config)] = r[at.kernel_fraction];
    });
    cols = keys.map(function(k){return longCols[at[k]];}).concat(series.map(function(s){
      return {name: s + ' kernel_fraction', title: s + ' kernel', pct: true};}));
    rows = out.map(function(r){for(var i = 0; i < cols.length; i++){if(r[i] === undefined){r[i] = null;}} return r;});
  }
  document.getElementById('layer-wide').addEventListener('click', function(e){
    wide = !wide;
    if(wide){widen();} else{cols = longCols; rows = longRows;}
    e.target.textContent = wide ? 'one row per quantizer' : 'wide view (quantizers side by side)';
    sortCol = -1; header(); render();
  });
  document.getElementById('layer-csv').addEventListener('click', function(){
    var quote = function(v){v = (v === null || v === undefined) ? '' : String(v);
      return /[",\n]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v;};
    var lines = [cols.map(function(c){return quote(c.name);}).join(',')].concat(
      shownRows().map(function(r){return r.map(quote).join(',');}));
    var link = document.createElement('a');
    link.href = URL.createObjectURL(new Blob([lines.join('\n') + '\n'], {type: 'text/csv'}));
    link.download = 'kernelscope-layers.csv';
    document.body.appendChild(link); link.click(); link.remove();
    table.setAttribute('data-csv-rows', String(lines.length - 1));
  });
  document.getElementById('layer-filter').addEventListener('input', function(e){
    filter = e.target.value.toLowerCase(); render();});
  header(); render();
});

(function(){
  var data = JSON.parse(KS.unpack('ks-data'));
  function parse(id){return data[id];}
  document.querySelectorAll('[data-figure]').forEach(function(div){
    var fig = parse(div.getAttribute('data-figure'));
    Plotly.newPlot(div, fig.data, fig.layout, {responsive:true, displaylogo:false});
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
    if(c.pct){return (100*v).toFixed(2) + '%';}
    if(typeof v === 'number' && !Number.isInteger(v)){return v.toPrecision(4);}
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
})();

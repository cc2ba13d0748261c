// plotly.js and the data unpacked side by side; plotly.js runs, then KS.ready gives the data.
KS.ready = Promise.all([KS.unpack('ks-plotly'), KS.unpack('ks-data')]).then(function(texts){
  var s = document.createElement('script');
  s.text = texts[0];
  document.head.appendChild(s);
  return JSON.parse(texts[1]);
});

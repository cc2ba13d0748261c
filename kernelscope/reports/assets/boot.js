(function(){
  var s = document.createElement('script');
  s.text = KS.unpack('ks-plotly');
  document.head.appendChild(s);
})();

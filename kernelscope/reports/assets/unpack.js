var KS = (function(){
  // A payload of kernelscope/reports/packing.py: gzip in base 64, the text of an inert element.
  // The browser decodes both: base 64 through a data: URL, gzip with DecompressionStream.
  function unpack(id){
    var text = document.getElementById(id).textContent;
    return fetch('data:application/octet-stream;base64,' + text).then(function(response){
      return new Response(response.body.pipeThrough(new DecompressionStream('gzip'))).text();
    });
  }
  return {unpack: unpack};
})();

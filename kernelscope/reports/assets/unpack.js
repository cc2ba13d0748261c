var KS = (function(){
  var ALPHABET = "KS_ALPHABET";
  function b85(text, size){
    var value = new Uint8Array(128), out = new Uint8Array(text.length / 5 * 4), n = 0;
    for(var i = 0; i < ALPHABET.length; i++){value[ALPHABET.charCodeAt(i)] = i;}
    for(var p = 0; p < text.length; p += 5){
      var w = 0;
      for(var k = 0; k < 5; k++){w = w * 85 + value[text.charCodeAt(p + k)];}
      out[n++] = (w / 16777216) & 255; out[n++] = (w >>> 16) & 255; out[n++] = (w >>> 8) & 255; out[n++] = w & 255;
    }
    return out.subarray(0, size);
  }
  function lzma(src, size){
    var d = src[0], lc = d % 9, lp = Math.floor(d / 9) % 5, pb = Math.floor(d / 45);
    var out = new Uint8Array(size), pos = 0, ip = 14, range = 4294967295, code = 0;
    for(var i = 0; i < 4; i++){code = code * 256 + src[ip++];}
    function probs(n){var a = new Uint16Array(n); a.fill(1024); return a;}
    function bit(p, j){
      var v = p[j], bound = (range >>> 11) * v, b;
      if(code < bound){range = bound; p[j] = v + ((2048 - v) >>> 5); b = 0;}
      else{range -= bound; code -= bound; p[j] = v - (v >>> 5); b = 1;}
      if(range < 16777216){range *= 256; code = code * 256 + src[ip++];}
      return b;
    }
    function tree(p, base, bits){var m = 1; for(var j = 0; j < bits; j++){m = (m << 1) + bit(p, base + m);} return m - (1 << bits);}
    function reverse(p, base, bits){
      var m = 1, s = 0;
      for(var j = 0; j < bits; j++){var b = bit(p, base + m); m = (m << 1) + b; s |= b << j;}
      return s;
    }
    function direct(bits){
      var r = 0;
      for(var j = 0; j < bits; j++){
        range = Math.floor(range / 2);
        if(code >= range){code -= range; r = r * 2 + 1;} else{r = r * 2;}
        if(range < 16777216){range *= 256; code = code * 256 + src[ip++];}
      }
      return r;
    }
    var isMatch = probs(192), isRep = probs(12), isRepG0 = probs(12), isRepG1 = probs(12), isRepG2 = probs(12);
    var isRep0Long = probs(192), lit = probs(768 << (lc + lp)), slots = probs(256), posDec = probs(115);
    var align = probs(16), matchLen = probs(514), repLen = probs(514);
    function length(p, ps){
      if(bit(p, 0) === 0){return tree(p, 2 + ps * 8, 3);}
      if(bit(p, 1) === 0){return 8 + tree(p, 130 + ps * 8, 3);}
      return 16 + tree(p, 258, 8);
    }
    function distance(len){
      var slot = tree(slots, (len < 3 ? len : 3) * 64, 6);
      if(slot < 4){return slot;}
      var bits = (slot >>> 1) - 1, dist = (2 + (slot & 1)) * Math.pow(2, bits);
      if(slot < 14){return dist + reverse(posDec, dist - slot, bits);}
      return dist + direct(bits - 4) * 16 + reverse(align, 0, 4);
    }
    var state = 0, rep0 = 0, rep1 = 0, rep2 = 0, rep3 = 0, pbMask = (1 << pb) - 1, lpMask = (1 << lp) - 1;
    while(pos < size){
      var ps = pos & pbMask;
      if(bit(isMatch, (state << 4) + ps) === 0){
        var prev = pos > 0 ? out[pos - 1] : 0, base = 768 * (((pos & lpMask) << lc) + (prev >>> (8 - lc))), s = 1;
        if(state >= 7){
          var mb = out[pos - rep0 - 1];
          while(s < 256){
            var mbit = (mb >>> 7) & 1; mb = (mb << 1) & 255;
            var b = bit(lit, base + ((1 + mbit) << 8) + s);
            s = (s << 1) | b;
            if(mbit !== b){break;}
          }
        }
        while(s < 256){s = (s << 1) | bit(lit, base + s);}
        out[pos++] = s - 256;
        state = state < 4 ? 0 : (state < 10 ? state - 3 : state - 6);
        continue;
      }
      var len;
      if(bit(isRep, state) !== 0){
        if(bit(isRepG0, state) === 0){
          if(bit(isRep0Long, (state << 4) + ps) === 0){
            state = state < 7 ? 9 : 11; out[pos] = out[pos - rep0 - 1]; pos++; continue;
          }
        } else{
          var dist;
          if(bit(isRepG1, state) === 0){dist = rep1;}
          else{if(bit(isRepG2, state) === 0){dist = rep2;} else{dist = rep3; rep3 = rep2;} rep2 = rep1;}
          rep1 = rep0; rep0 = dist;
        }
        len = length(repLen, ps); state = state < 7 ? 8 : 11;
      } else{
        rep3 = rep2; rep2 = rep1; rep1 = rep0;
        len = length(matchLen, ps); state = state < 7 ? 7 : 10;
        rep0 = distance(len);
        if(rep0 === 4294967295){break;}
        if(rep0 >= pos){throw new Error('damaged report payload');}
      }
      for(var k = len + 2; k > 0 && pos < size; k--){out[pos] = out[pos - rep0 - 1]; pos++;}
    }
    if(pos !== size){throw new Error('damaged report payload');}
    return out;
  }
  function unpack(id){
    var el = document.getElementById(id);
    var bytes = lzma(b85(el.textContent, +el.getAttribute('data-packed')), +el.getAttribute('data-size'));
    return new TextDecoder('utf-8').decode(bytes);
  }
  return {unpack: unpack, b85: b85, lzma: lzma};
})();

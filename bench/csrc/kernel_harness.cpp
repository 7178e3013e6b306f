// Standalone timing of the cpu kernel against its floor, without Python or torch in the way (used
// to tune sparse_ops/csrc/sparse_mlp_kernel.h; tuning macros: SAM_VIZ_PF_HINT, SAM_VIZ_PF_BYTES,
// SAM_VIZ_PF_EVERY, SAM_VIZ_ROWS, SAM_VIZ_FLOOR_ROWS, SAM_VIZ_PAIR):
//   g++ -O3 -march=native -fopenmp -std=c++17 -Isparse_ops/csrc bench/csrc/kernel_harness.cpp -o /tmp/kh
//   OMP_NUM_THREADS=2 /tmp/kh
// Prints median ms of the kernel and of the floor (each call on the next weight copy, >600 MiB of
// copies) and their ratio, at the TinyLlama and Llama-7B shapes, fp32 and bf16. Noisy: compare
// variants in alternation, several times.
#include "sparse_mlp_kernel.h"
#include <chrono>
#include <cstdio>
#include <random>
#include <algorithm>
#include <memory>
#include <string>
using namespace samviz;
static double now(){return std::chrono::duration<double,std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();}
template<typename W> W cvt(float f);
template<> float cvt<float>(float f){return f;}
template<> uint16_t cvt<uint16_t>(float f){uint32_t b; memcpy(&b,&f,4); return (uint16_t)(b>>16);}
// Weights placed as torch places a large tensor (64 bytes past a page boundary), so that page-offset
// effects (see skewed() in the kernel) are the ones the Python path sees.
template<typename W> struct Buf { W* p; size_t n; explicit Buf(size_t n_):n(n_){ p = reinterpret_cast<W*>(static_cast<char*>(std::aligned_alloc(4096, (n*sizeof(W)+8191)/4096*4096)) + 64); }
  ~Buf(){ std::free(reinterpret_cast<char*>(p) - 64); } Buf(const Buf&)=delete; W* data(){return p;} W* begin(){return p;} W* end(){return p+n;} };
template<typename W> void go(int64_t d, int64_t dff, const char* name){
  int64_t per = 3*d*dff*sizeof(W); int ncp = std::max<int64_t>(3, (600ll<<20)/per + 1);
  std::mt19937 rng(0); std::normal_distribution<float> nd;
  std::vector<std::unique_ptr<Buf<W>>> gu, dn;
  for(int c=0;c<ncp;c++){gu.emplace_back(new Buf<W>(2*d*dff)); dn.emplace_back(new Buf<W>(d*dff)); for(auto&v:*gu[c]) v=cvt<W>(nd(rng)*0.02f); for(auto&v:*dn[c]) v=cvt<W>(nd(rng)*0.02f);}
  std::vector<float> x(d); for(auto&v:x) v=nd(rng);
  int call=0;
  for(double dens: {0.05,0.1,0.5}){
    int64_t k = llround(dens*dff);
    std::vector<std::vector<int64_t>> sets(7);
    for(auto&s:sets){std::vector<int64_t> p(dff); for(int64_t i=0;i<dff;i++)p[i]=i; std::shuffle(p.begin(),p.end(),rng); s.assign(p.begin(),p.begin()+k); std::sort(s.begin(),s.end());}
    std::vector<float> y(d), h(k);
    std::vector<double> tk, tf; double sink=0;
    for(int it=0; it<32; it++){
      auto& s = sets[it%7]; int c = (call++)%ncp;
      Problem<W> P{x.data(),1,d,gu[c]->data(),2,dn[c]->data(),d,nullptr,nullptr,nullptr,s.data(),k,0,y.data(),h.data()};
      double t0=now(); run(P); double t1=now();
      c = (call++)%ncp;
      sink += read_rows(gu[c]->data(), 2*d, dn[c]->data(), d, s.data(), k); double t2=now();
      if(it>=2){tk.push_back(t1-t0); tf.push_back(t2-t1);}
    }
    std::sort(tk.begin(),tk.end()); std::sort(tf.begin(),tf.end());
    double mk=tk[tk.size()/2], mf=tf[tf.size()/2]; double gb = k*3.0*d*sizeof(W)/1e9;
    printf("%s %s %.2f kernel %.3f ms (%.1f GB/s) floor %.3f ms (%.1f GB/s) ratio %.3f  %g\n", name, sizeof(W)==4?"fp32":"bf16", dens, mk, gb/mk*1e3, mf, gb/mf*1e3, mk/mf, sink*0);
  }
}
int main(int argc,char**argv){
  // optional argument: which to run, e.g. "tiny-bf16" (default all four)
  const std::string want = argc > 1 ? argv[1] : "";
  auto on = [&](const char* s) { return want.empty() || want.find(s) != std::string::npos; };
  if (on("tiny-fp32")) go<float>(2048,5632,"tiny");
  if (on("tiny-bf16")) go<uint16_t>(2048,5632,"tiny");
  if (on("llama-fp32")) go<float>(4096,11008,"llama");
  if (on("llama-bf16")) go<uint16_t>(4096,11008,"llama");
}

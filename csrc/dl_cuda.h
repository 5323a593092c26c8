/* The CUDA driver API as libce uses it: the few types, declared here so that no CUDA header is
 * needed at build time, and one table entry per symbol under its C declaration. Each entry names
 * the symbol cuda.h maps the function to (the _v2 ones), since that is what dlsym must find. */
#ifndef CE_DL_CUDA_H
#define CE_DL_CUDA_H

#include <stddef.h>
#include <stdint.h>

typedef int CUresult; /* CUDA_SUCCESS 0, CUDA_ERROR_NOT_READY 600 */
typedef int CUdevice;
typedef struct CUctx_st *CUcontext;
typedef struct CUstream_st *CUstream;
typedef struct CUevent_st *CUevent;
typedef struct CUmod_st *CUmodule;
typedef struct CUfunc_st *CUfunction;
typedef uint64_t CUdeviceptr;
typedef struct { char reserved[64]; } CUipcMemHandle;
typedef struct { char bytes[16]; } CUuuid;

#define CUDA_SUCCESS 0
#define CUDA_ERROR_NOT_READY 600
#define CUDA_ERROR_OUT_OF_MEMORY 2
#define CU_MEMHOSTREGISTER_PORTABLE 0x01
#define CU_MEMHOSTREGISTER_READ_ONLY 0x08
#define CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS 0x1
#define CU_STREAM_NON_BLOCKING 0x1
#define CU_EVENT_DEFAULT 0x0
#define CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR 75
#define CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR 76

/* CE_CU(field, symbol, return type, parameter types) */
#define CE_CUDA_SYMBOLS(CE_CU)                                                                          \
  /* CUresult cuInit(unsigned int Flags); */                                                            \
  CE_CU(cuInit, "cuInit", CUresult, (unsigned int))                                                     \
  /* CUresult cuDriverGetVersion(int *driverVersion); */                                                \
  CE_CU(cuDriverGetVersion, "cuDriverGetVersion", CUresult, (int *))                                    \
  /* CUresult cuGetErrorName(CUresult error, const char **pStr); */                                     \
  CE_CU(cuGetErrorName, "cuGetErrorName", CUresult, (CUresult, const char **))                          \
  /* CUresult cuGetErrorString(CUresult error, const char **pStr); */                                   \
  CE_CU(cuGetErrorString, "cuGetErrorString", CUresult, (CUresult, const char **))                      \
  /* CUresult cuDeviceGetCount(int *count); */                                                          \
  CE_CU(cuDeviceGetCount, "cuDeviceGetCount", CUresult, (int *))                                        \
  /* CUresult cuDeviceGet(CUdevice *device, int ordinal); */                                            \
  CE_CU(cuDeviceGet, "cuDeviceGet", CUresult, (CUdevice *, int))                                        \
  /* CUresult cuDeviceGetName(char *name, int len, CUdevice dev); */                                    \
  CE_CU(cuDeviceGetName, "cuDeviceGetName", CUresult, (char *, int, CUdevice))                          \
  /* CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice dev);  cuda.h: cuDeviceGetUuid_v2 */                \
  CE_CU(cuDeviceGetUuid, "cuDeviceGetUuid_v2", CUresult, (CUuuid *, CUdevice))                          \
  /* CUresult cuDeviceTotalMem(size_t *bytes, CUdevice dev);  cuda.h: _v2 */                            \
  CE_CU(cuDeviceTotalMem, "cuDeviceTotalMem_v2", CUresult, (size_t *, CUdevice))                        \
  /* CUresult cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev); */                \
  CE_CU(cuDeviceGetAttribute, "cuDeviceGetAttribute", CUresult, (int *, int, CUdevice))                 \
  /* CUresult cuDeviceGetPCIBusId(char *pciBusId, int len, CUdevice dev); */                            \
  CE_CU(cuDeviceGetPCIBusId, "cuDeviceGetPCIBusId", CUresult, (char *, int, CUdevice))                  \
  /* CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev); */                               \
  CE_CU(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", CUresult, (CUcontext *, CUdevice))        \
  /* CUresult cuDevicePrimaryCtxRelease(CUdevice dev);  cuda.h: _v2 */                                  \
  CE_CU(cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2", CUresult, (CUdevice))                \
  /* CUresult cuCtxSetCurrent(CUcontext ctx); */                                                        \
  CE_CU(cuCtxSetCurrent, "cuCtxSetCurrent", CUresult, (CUcontext))                                      \
  /* CUresult cuMemGetInfo(size_t *free, size_t *total);  cuda.h: _v2 */                                \
  CE_CU(cuMemGetInfo, "cuMemGetInfo_v2", CUresult, (size_t *, size_t *))                                \
  /* CUresult cuMemAlloc(CUdeviceptr *dptr, size_t bytesize);  cuda.h: _v2 */                           \
  CE_CU(cuMemAlloc, "cuMemAlloc_v2", CUresult, (CUdeviceptr *, size_t))                                 \
  /* CUresult cuMemFree(CUdeviceptr dptr);  cuda.h: _v2 */                                              \
  CE_CU(cuMemFree, "cuMemFree_v2", CUresult, (CUdeviceptr))                                             \
  /* CUresult cuMemHostRegister(void *p, size_t bytesize, unsigned int Flags);  cuda.h: _v2 */          \
  CE_CU(cuMemHostRegister, "cuMemHostRegister_v2", CUresult, (void *, size_t, unsigned int))            \
  /* CUresult cuMemHostUnregister(void *p); */                                                          \
  CE_CU(cuMemHostUnregister, "cuMemHostUnregister", CUresult, (void *))                                 \
  /* CUresult cuIpcGetMemHandle(CUipcMemHandle *pHandle, CUdeviceptr dptr); */                          \
  CE_CU(cuIpcGetMemHandle, "cuIpcGetMemHandle", CUresult, (CUipcMemHandle *, CUdeviceptr))              \
  /* CUresult cuIpcOpenMemHandle(CUdeviceptr *pdptr, CUipcMemHandle handle, unsigned int Flags);        \
     cuda.h: _v2; the 64-byte handle is passed by value */                                              \
  CE_CU(cuIpcOpenMemHandle, "cuIpcOpenMemHandle_v2", CUresult, (CUdeviceptr *, CUipcMemHandle, unsigned int)) \
  /* CUresult cuIpcCloseMemHandle(CUdeviceptr dptr); */                                                 \
  CE_CU(cuIpcCloseMemHandle, "cuIpcCloseMemHandle", CUresult, (CUdeviceptr))                            \
  /* CUresult cuStreamCreate(CUstream *phStream, unsigned int Flags); */                                \
  CE_CU(cuStreamCreate, "cuStreamCreate", CUresult, (CUstream *, unsigned int))                         \
  /* CUresult cuStreamDestroy(CUstream hStream);  cuda.h: _v2 */                                        \
  CE_CU(cuStreamDestroy, "cuStreamDestroy_v2", CUresult, (CUstream))                                    \
  /* CUresult cuStreamSynchronize(CUstream hStream); */                                                 \
  CE_CU(cuStreamSynchronize, "cuStreamSynchronize", CUresult, (CUstream))                               \
  /* CUresult cuStreamQuery(CUstream hStream);  CUDA_ERROR_NOT_READY while work is pending */          \
  CE_CU(cuStreamQuery, "cuStreamQuery", CUresult, (CUstream))                                           \
  /* CUresult cuStreamWaitEvent(CUstream hStream, CUevent hEvent, unsigned int Flags); */               \
  CE_CU(cuStreamWaitEvent, "cuStreamWaitEvent", CUresult, (CUstream, CUevent, unsigned int))            \
  /* CUresult cuEventCreate(CUevent *phEvent, unsigned int Flags); */                                   \
  CE_CU(cuEventCreate, "cuEventCreate", CUresult, (CUevent *, unsigned int))                            \
  /* CUresult cuEventDestroy(CUevent hEvent);  cuda.h: _v2 */                                           \
  CE_CU(cuEventDestroy, "cuEventDestroy_v2", CUresult, (CUevent))                                       \
  /* CUresult cuEventRecord(CUevent hEvent, CUstream hStream); */                                       \
  CE_CU(cuEventRecord, "cuEventRecord", CUresult, (CUevent, CUstream))                                  \
  /* CUresult cuEventQuery(CUevent hEvent);  CUDA_ERROR_NOT_READY while pending */                      \
  CE_CU(cuEventQuery, "cuEventQuery", CUresult, (CUevent))                                              \
  /* CUresult cuEventSynchronize(CUevent hEvent); */                                                    \
  CE_CU(cuEventSynchronize, "cuEventSynchronize", CUresult, (CUevent))                                  \
  /* CUresult cuEventElapsedTime(float *pMilliseconds, CUevent hStart, CUevent hEnd);                   \
     CUDA 13's header maps it to _v2; the original symbol stays in every driver */                     \
  CE_CU(cuEventElapsedTime, "cuEventElapsedTime", CUresult, (float *, CUevent, CUevent))                \
  /* CUresult cuModuleLoadData(CUmodule *module, const void *image); */                                 \
  CE_CU(cuModuleLoadData, "cuModuleLoadData", CUresult, (CUmodule *, const void *))                     \
  /* CUresult cuModuleUnload(CUmodule hmod); */                                                         \
  CE_CU(cuModuleUnload, "cuModuleUnload", CUresult, (CUmodule))                                         \
  /* CUresult cuModuleGetFunction(CUfunction *hfunc, CUmodule hmod, const char *name); */               \
  CE_CU(cuModuleGetFunction, "cuModuleGetFunction", CUresult, (CUfunction *, CUmodule, const char *))   \
  /* CUresult cuLaunchKernel(CUfunction f, unsigned gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY,  \
     blockDimZ, unsigned sharedMemBytes, CUstream hStream, void **kernelParams, void **extra); */        \
  CE_CU(cuLaunchKernel, "cuLaunchKernel", CUresult,                                                     \
        (CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream, void **, void **)) \
  /* CUresult cuMemcpyHtoDAsync(CUdeviceptr dst, const void *src, size_t n, CUstream s);  _v2 */        \
  CE_CU(cuMemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2", CUresult, (CUdeviceptr, const void *, size_t, CUstream)) \
  /* CUresult cuMemcpyDtoHAsync(void *dst, CUdeviceptr src, size_t n, CUstream s);  _v2 */              \
  CE_CU(cuMemcpyDtoHAsync, "cuMemcpyDtoHAsync_v2", CUresult, (void *, CUdeviceptr, size_t, CUstream))   \
  /* CUresult cuMemcpyDtoDAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s);  _v2 */        \
  CE_CU(cuMemcpyDtoDAsync, "cuMemcpyDtoDAsync_v2", CUresult, (CUdeviceptr, CUdeviceptr, size_t, CUstream))

struct ce_cuda_api {
#define CE_CU_FIELD(field, symbol, ret, params) ret(*field) params;
  CE_CUDA_SYMBOLS(CE_CU_FIELD)
#undef CE_CU_FIELD
};

extern struct ce_cuda_api cu;

/* Sets the thread's last error to "<what>: CUDA_ERROR_X: <text>" and returns CE_E_CUDA (or
 * CE_E_NOMEM for out-of-memory). */
int ce_cuda_fail(CUresult r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Writes "CUDA_ERROR_X: text" for r into buf. */
void ce_cuda_describe(CUresult r, char *buf, size_t len);
int ce_cuda_loaded(void);

#endif
